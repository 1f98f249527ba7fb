class RetrofitError(Exception):
    """A user-facing failure: bad input, missing files, a refused operation. The CLI prints its
    message on one line and exits with `exit_code`; nothing has been written when it is raised."""

    exit_code = 1


class SourceError(RetrofitError):
    """The source cannot be found or read (missing or corrupt files, unknown or unreachable Hub id)."""

    exit_code = 3


class UnsupportedModelError(RetrofitError):
    exit_code = 4


class OutputExistsError(RetrofitError):
    exit_code = 5


class UploadError(RetrofitError):
    exit_code = 6

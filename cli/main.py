"""The `hola-retrofit` command line."""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import tempfile
from pathlib import Path

import click

from ..adapters.config import EVICTIONS, READ_RULES, MemoryConfig
from ..evals.tasks import DEPTHS, PHRASINGS, Templates
from ..retrofit.errors import RetrofitError

BLOCK_SIZES = (16, 32, 64, 128, 256, 512, 1024)  # one block is one tile of the fused kernels: a power of 2, >= 16


def _fail(e: Exception) -> None:
    click.echo(f"error: {e}", err=True)
    sys.exit(getattr(e, 'exit_code', 1))


@contextlib.contextmanager
def _destination(out):
    """The folder to write: --out, or (with --push-to-hub alone) a temporary one, removed afterwards."""
    if out is not None:
        yield Path(out), False
        return
    tmp = Path(tempfile.mkdtemp(prefix='hola-'))
    try:
        yield tmp / 'model', True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _push(path: Path, repo: str, **kw) -> None:
    """Rewrite the model card for `repo`, upload the folder, say where it went."""
    from transformers import AutoConfig

    from ..retrofit.card import write_model_card
    from ..retrofit.hub import push_folder
    write_model_card(path, AutoConfig.from_pretrained(path), repo_id=repo)
    click.echo(f"pushed to {push_folder(path, repo, **kw)}")


def _split_rev(src: str, revision: str | None) -> tuple[str, str | None]:
    if '@' in src and revision is None and not src.startswith(('.', '/', '~')):
        src, revision = src.split('@', 1)
    return src, revision


def _block(ctx, param, value):
    if value is not None and value not in BLOCK_SIZES:
        raise click.BadParameter(f"{value} is not a block size the kernels allow; use one of "
                                 f"{', '.join(map(str, BLOCK_SIZES))}")
    return value


def memory_options(f):
    opts = [
        click.option('--cache', 'cache', type=click.IntRange(min=0), required=True,
                     help='Entries kept per layer and value head (M). 0 with --no-block-read: memory off.'),
        click.option('--block', 'block', type=int, default=64, show_default=True, callback=_block,
                     help='Block size C: queries read their block exactly; the cache merges at block ends.'),
        click.option('--read', 'read_rule', type=click.Choice(READ_RULES), default='shared', show_default=True,
                     help="Combination rule: 'shared' (training-free: the state is the sink's value) or "
                          "'gated' (HOLA's gated sum).")
        , click.option('--eviction', type=click.Choice(EVICTIONS), default='surprise', show_default=True,
                       help="'surprise' keeps the top-M beta*||e||; 'recency' keeps the last M tokens."),
        click.option('--block-read/--no-block-read', 'read_block', default=True, show_default=True,
                     help='Whether queries read the current block.'),
        click.option('--gamma', 'gamma_init', type=float, default=MemoryConfig.gamma_init, show_default=True,
                     help='Initial RMSNorm-gamma of the cache-path q and k.'),
        click.option('--sink', 'sink_init', type=float, default=MemoryConfig.sink_init, show_default=True,
                     help='Initial sink logit.'),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _memory(kw) -> MemoryConfig:
    return MemoryConfig(cache_size=kw['cache'], block_size=kw['block'], read_rule=kw['read_rule'],
                        eviction=kw['eviction'], read_block=kw['read_block'], gamma_init=kw['gamma_init'],
                        sink_init=kw['sink_init'])


@click.group(context_settings={'help_option_names': ['-h', '--help']})
@click.version_option(package_name='hola-retrofit')
def main():
    """Give pretrained Gated DeltaNet / DeltaNet checkpoints (flash-linear-attention) an exact memory."""


@main.command()
@click.argument('src')
@memory_options
@click.option('--out', type=click.Path(file_okay=False), help='Output folder (must not exist, unless --force).')
@click.option('--push-to-hub', 'push', metavar='REPO', help='Upload the result to this Hub repo.')
@click.option('--private', is_flag=True, help='With --push-to-hub: create the repo private.')
@click.option('--revision', help='With --push-to-hub: the branch to push to.')
@click.option('--commit-message', help='With --push-to-hub: the commit message.')
@click.option('--source-revision', help='Revision of a Hub SRC (also: SRC@REV).')
@click.option('--dtype', type=click.Choice(['float32', 'bfloat16', 'float16']), help='Cast the base weights.')
@click.option('--recipe/--no-recipe', default=True, show_default=True,
              help='Fit the memory on the model itself (which heads read, their temperature and sink, which layers '
                   'hold the entries); --no-recipe: every head reads with --gamma and --sink.')
@click.option('--calibration-text', type=click.Path(exists=True, dir_okay=False),
              help='Text the recipe is fitted on (default: a text shipped with the package).')
@click.option('--device', help='Device of the recipe fit (default: cuda if available, else cpu).')
@click.option('--force', is_flag=True, help='Replace an existing --out folder.')
@click.option('-q', '--quiet', is_flag=True, help='No progress bars.')
def convert(src, out, push, private, revision, commit_message, source_revision, dtype, recipe, calibration_text,
            device, force, quiet, **kw):
    """Convert SRC (a local folder or a Hub repo id) into a memory-augmented checkpoint."""
    from ..retrofit.convert import convert as do_convert

    if not out and not push:
        raise click.UsageError('give --out DIR, --push-to-hub REPO, or both')
    if (private or revision or commit_message) and not push:
        raise click.UsageError('--private, --revision and --commit-message go with --push-to-hub')
    src, source_revision = _split_rev(src, source_revision)
    try:
        mem = _memory(kw)
        with _destination(out) as (path, temporary):
            path = do_convert(src, path, mem, revision=source_revision, dtype=dtype, force=force, progress=not quiet,
                              recipe=recipe, calibration_text=calibration_text, device=device)
            if recipe:
                click.echo(_recipe_summary(path))
            if not temporary:
                click.echo(f"wrote {path}")
            if push:
                _push(path, push, private=private, revision=revision, commit_message=commit_message)
    except (RetrofitError, ValueError) as e:
        _fail(e)


def _recipe_summary(path: Path) -> str:
    from ..retrofit.recipe import RECIPE_FILE, Recipe
    rec = Recipe.from_dict(json.loads((path / RECIPE_FILE).read_text()))
    if not rec.reading:
        return 'recipe: ' + '; '.join(rec.notes)
    heads = ', '.join(f'layer {h.layer} head {h.head} (tau {h.tau:g}, sink {h.sink:.1f})' for h in rec.reading)
    layers = ', '.join(f'layer {i}: {m}' for i, m in enumerate(rec.cache_sizes) if m)
    return (f"recipe: {len(rec.reading)} of {len(rec.heads)} heads read: {heads}; entries per head: {layers}; "
            f"no memory in the other layers ({RECIPE_FILE})")


@main.command()
@click.argument('model')
@click.option('--revision', help='Hub revision of MODEL.')
@click.option('--cache', type=click.IntRange(min=0), default=None, help='For a base model: the M to report.')
@click.option('--block', type=int, default=64, callback=_block, help='For a base model: the C to report.')
@click.option('--json', 'as_json', is_flag=True, help='Print JSON.')
def info(model, revision, cache, block, as_json):
    """Architecture, patched layers, memory settings and memory bytes of MODEL."""
    from ..retrofit.info import model_info
    model, revision = _split_rev(model, revision)
    try:
        mem = MemoryConfig(cache_size=cache, block_size=block) if cache is not None else None
        d = model_info(model, revision, mem)
    except (RetrofitError, ValueError) as e:
        _fail(e)
    if as_json:
        click.echo(json.dumps(d, indent=1))
        return
    click.echo(f"{d['source']}: {d['model_type']}{'' if d['converted'] else ' (base: values for a conversion)'}")
    if d['base']:
        click.echo(f"  base model: {d['base'].get('model_id')} @ {d['base'].get('revision')}")
    click.echo(f"  layers: {d['num_layers']}, memory in {len(d['patched_layers'])}: {d['patched_layers']}")
    for layer in d['layers']:
        if not layer['memory_bytes']:
            click.echo(f"  layer {layer['layer']}: {layer['mixer']} (left alone)")
    click.echo("  memory: " + ", ".join(f"{k}={v}" for k, v in d['memory'].items()))
    click.echo(f"  memory parameters: {d['memory_parameters']:,}")
    per = {layer['memory_bytes'] for layer in d['layers'] if layer['memory_bytes']}
    click.echo(f"  memory per sequence ({d['dtype']}): {', '.join(f'{b:,}' for b in sorted(per))} bytes per layer, "
               f"{d['memory_bytes_total']:,} bytes in total, at any context length")


def _lengths(ctx, param, value):
    from ..evals.tasks import parse_length
    try:
        out = [parse_length(v) for v in value.split(',') if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r}: give lengths like 2k,4k,8k or 2048,4096") from None
    if not out or min(out) < 16:
        raise click.BadParameter("lengths must be >= 16 tokens")
    return out


def _depths(ctx, param, value):
    try:
        out = [float(v) for v in value.split(',') if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r}: give depths like 0,0.5,1") from None
    if not out or not all(0.0 <= d <= 1.0 for d in out):
        raise click.BadParameter("depths are fractions in [0, 1]")
    return out


@main.command('eval')
@click.argument('model')
@click.option('--baseline', help='Base model to compare with (default: MODEL with its memory off, '
                                 'which computes exactly what the base checkpoint computes).')
@click.option('--task', 'tasks', type=click.Choice(['niah', 'multikey', 'kv', 'copy', 'ppl']), multiple=True,
              default=['niah'], show_default=True,
              help='Repeat for several tasks. copy: [X, filler, X], the lengths are the filler\'s.')
@click.option('--phrasing', 'phrasings', type=click.Choice(list(PHRASINGS)), multiple=True, default=['passkey'],
              show_default=True, help='Needle phrasing of niah; repeat for several. secret: the reference '
                                      "checkpoints' training format; locker: the same shape in unseen words.")
@click.option('--lengths', default='2k,4k,8k,16k,32k', show_default=True, callback=_lengths)
@click.option('--depths', default=','.join(f'{d:g}' for d in DEPTHS), show_default=True, callback=_depths)
@click.option('--trials', type=click.IntRange(min=1), default=3, show_default=True)
@click.option('--seed', type=int, default=0, show_default=True)
@click.option('--haystack', type=click.Path(exists=True, dir_okay=False), help='Filler text file.')
@click.option('--text', type=click.Path(exists=True, dir_okay=False), help='Text file for ppl.')
@click.option('--needle', help='Needle template with {key}.')
@click.option('--question', help='Question template (the answer follows it).')
@click.option('--out', 'out_dir', type=click.Path(file_okay=False), default='hola-eval', show_default=True)
@click.option('--device', default=None, help='cpu, cuda, ... (default: cuda if available)')
@click.option('--dtype', type=click.Choice(['float32', 'bfloat16', 'float16']), default=None)
@click.option('-q', '--quiet', is_flag=True)
def eval_cmd(model, baseline, tasks, phrasings, lengths, depths, trials, seed, haystack, text, needle, question,
             out_dir, device, dtype, quiet):
    """Recall (needle, multi-key, key-value) and perplexity of MODEL against its base; table, JSON, PNG."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..evals.runner import compare, memory_off, summary_table

    device = device or ('cuda' if torch.cuda.is_available() else 'cpu')
    kw = {'dtype': getattr(torch, dtype)} if dtype else {}
    runs = [(task, None, Templates()) for task in tasks if task != 'niah']
    if 'niah' in tasks:
        if needle or question:
            if needle and '{key}' not in needle:
                raise click.BadParameter('the needle template needs {key}', param_hint='--needle')
            custom = Templates()
            custom.needle, custom.question = needle or custom.needle, question or custom.question
            runs.insert(0, ('niah', 'custom', custom))
        else:
            runs[:0] = [('niah', p, Templates.phrasing(p)) for p in phrasings]
    try:
        tok = AutoTokenizer.from_pretrained(model)
        lm = AutoModelForCausalLM.from_pretrained(model, **kw).to(device).eval()
        models = {'retrofit' if hasattr(lm.config, 'hola') else 'model': lm}
        if baseline:
            models['base'] = AutoModelForCausalLM.from_pretrained(baseline, **kw).to(device).eval()
        elif hasattr(lm.config, 'hola'):
            models = {'base': (lm, memory_off), **models}
    except (OSError, ValueError) as e:
        _fail(RetrofitError(f"cannot load: {e}"))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    read = lambda p: Path(p).read_text() if p else None  # noqa: E731
    all_results = []
    for task, phrasing, templates in runs:
        res = compare(models, tok, task, lengths, depths, trials, seed, templates, read(haystack), read(text),
                      progress=not quiet, phrasing=phrasing)
        res['model'], res['device'] = model, str(device)
        all_results.append(res)
        click.echo(summary_table(res))
        try:
            from ..evals.plots import write_plots
            for f in write_plots(res, out):
                click.echo(f"plot: {f}")
        except ImportError:
            click.echo("matplotlib is not installed: no plots (pip install 'hola-retrofit[plots]')", err=True)
    (out / 'results.json').write_text(json.dumps(all_results, indent=1, default=str))
    click.echo(f"results: {out / 'results.json'}")


@main.command()
@click.argument('model')
@click.option('--data', type=click.Path(exists=True, dir_okay=False), required=True, help='A text file.')
@click.option('--steps', type=click.IntRange(min=1), default=200, show_default=True)
@click.option('--lr', type=click.FloatRange(min=0, min_open=True), default=1e-2, show_default=True)
@click.option('--lora-r', type=click.IntRange(min=0), default=0, show_default=True,
              help='LoRA rank on the mixer projections (0: train the memory parameters only).')
@click.option('--batch-size', type=click.IntRange(min=1), default=4, show_default=True)
@click.option('--seq-len', type=click.IntRange(min=8), default=512, show_default=True)
@click.option('--eval-lengths', default=None, help='Also measure needle recall at these lengths, before/after.')
@click.option('--out', type=click.Path(file_okay=False), help='Output folder (merged model + peft_adapter/).')
@click.option('--push-to-hub', 'push', metavar='REPO', help='Upload the result to this Hub repo.')
@click.option('--private', is_flag=True)
@click.option('--seed', type=int, default=0, show_default=True)
@click.option('--force', is_flag=True)
@click.option('-q', '--quiet', is_flag=True)
def calibrate(model, data, steps, lr, lora_r, batch_size, seq_len, eval_lengths, out, push, private, seed, force, quiet):
    """Briefly train MODEL's memory parameters (PEFT; optional LoRA) on a text file; `accelerate launch` for many GPUs."""
    from ..retrofit.calibrate import calibrate as do_calibrate
    if not out and not push:
        raise click.UsageError('give --out DIR, --push-to-hub REPO, or both')
    lengths = _lengths(None, None, eval_lengths) if eval_lengths else None
    try:
        with _destination(out) as (path, temporary):
            res = do_calibrate(model, data, path, steps=steps, lr=lr, lora_r=lora_r, batch_size=batch_size,
                               seq_len=seq_len, seed=seed, force=force, eval_lengths=lengths, progress=not quiet)
            if res.get('after') is None:
                return  # not the main process
            last = res['losses'][-10:]
            click.echo(f"loss {res['losses'][0]:.4f} -> {sum(last) / len(last):.4f} (mean of the last 10) over "
                       f"{steps} steps; {res['trainable_parameters']:,} trainable parameters")
            click.echo(f"before: {res['before']}\nafter:  {res['after']}")
            if not temporary:
                click.echo(f"wrote {path}")
            if push:
                _push(path, push, private=private)
    except (RetrofitError, ValueError) as e:
        _fail(e)


@main.command()
@click.argument('out', type=click.Path(file_okay=False))
@click.option('--arch', type=click.Choice(['gdn', 'deltanet', 'hybrid']), default='gdn', show_default=True)
@click.option('--hidden', type=click.IntRange(min=16), default=64, show_default=True)
@click.option('--layers', type=click.IntRange(min=1), default=2, show_default=True)
@click.option('--seed', type=int, default=0, show_default=True)
def example(out, arch, hidden, layers, seed):
    """Write a tiny random fla checkpoint (byte-level tokenizer) to OUT: a default to try the tools on."""
    from ..retrofit.example import make_example_checkpoint
    if Path(out).exists():
        _fail(RetrofitError(f"{out} exists"))
    make_example_checkpoint(out, arch, seed, hidden, layers)
    click.echo(f"wrote {out} (random weights: {arch}, hidden {hidden}, {layers} layers)")


@main.command()
@click.argument('model')
@click.argument('prompt')
@click.option('--max-new-tokens', type=click.IntRange(min=1), default=32, show_default=True)
@click.option('--device', default=None, help='cpu, cuda, ... (default: cuda if available)')
def generate(model, prompt, max_new_tokens, device):
    """Load MODEL with from_pretrained and greedily continue PROMPT."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    device = device or ('cuda' if torch.cuda.is_available() else 'cpu')
    try:
        tok = AutoTokenizer.from_pretrained(model)
        lm = AutoModelForCausalLM.from_pretrained(model).to(device).eval()
    except (OSError, ValueError) as e:
        _fail(RetrofitError(f"cannot load {model}: {e}"))
    ids = tok(prompt, return_tensors='pt').to(device)
    with torch.no_grad():
        out = lm.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
    click.echo(tok.decode(out[0], skip_special_tokens=True))
    cache_note = ''
    if hasattr(lm.config, 'hola'):
        cache_note = f" (memory: M={lm.config.hola['cache_size']}, C={lm.config.hola['block_size']})"
    click.echo(f"[{type(lm).__name__}{cache_note} on {device}]", err=True)


if __name__ == '__main__':
    main()

"""Compile every Triton kernel of the package for a Hopper GPU (sm_90) on a machine without one.

The interpreter (TRITON_INTERPRET=1, how CI runs the kernels) does not type-check what the compiler does,
e.g. a variable that is int64 in one branch of a runtime `if` and int32 in the other. Run without
TRITON_INTERPRET; the argument types follow the host wrappers' launches (bf16 model tensors)."""

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from hola_retrofit.kernels import read, select, write

TARGET = GPUTarget('cuda', 90, 32)
FLOATS = ('eps', 'eps_l2', 'scale')


def compile_kernel(fn, ptrs: dict, consts: dict) -> None:
    fn = fn.fn if isinstance(fn, triton.runtime.Autotuner) else fn
    sig = {n: 'constexpr' if n in consts else ptrs.get(n, 'fp32' if n in FLOATS else 'i32') for n in fn.arg_names}
    triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=TARGET)
    print(fn.__name__, {k: v for k, v in consts.items() if k in ('HAS_OLD', 'ONLINE', 'STATE', 'V_FIRST', 'STEP', 'HAS_POS', 'RESET')}, 'ok')


def main():
    bf = '*bf16'
    for has_old, online, state in ((False, False, 0), (True, False, 0), (False, True, 0), (True, True, 0),
                                   (False, False, 1), (False, False, 2)):
        compile_kernel(read._prefill_read_kernel,
                       dict(Q=bf, KO=bf, VO=bf, KN=bf, VN=bf, OST=bf, OUT=bf, IDX='*i32', CNT='*i32', W='*fp32', RO='*fp32',
                            RN='*fp32', FLAG='*i8', READY='*i32', KL=bf, VS=bf, HS=bf, GS='*fp32'),
                       dict(G=1, K=256, V=512, BQ=64, BK=256, BN=32, BV=256, SHARED=True, READ_BLOCK=True,
                            PREC='tf32', LOWP=True, HAS_OLD=has_old, ONLINE=online, STATE=state > 0,
                            V_FIRST=state == 1, USE_G=state == 1, BKS=64))  # state 1: GDN's, 2: DeltaNet's
    for step in (0, 1, 2):
        compile_kernel(read._decode_kernel,
                       dict(Q=bf, KR=bf, VR=bf, CK=bf, CV=bf, BKT=bf, BVL=bf, A_RAW=bf, BETA=bf, ST='*fp32',
                            A_LOG='*fp32', DT_BIAS='*fp32', SEEN='*i64', CP='*i64', PART='*fp32', OST='*fp32',
                            PM='*fp32', PL='*fp32', PACC='*fp32', W='*fp32', SC='*fp32', OUT=bf, CS='*fp32',
                            BS='*fp32', RANK='*i32', TICKET='*i32'),
                       dict(G=2, K=128, V=256, M=64, C=64, BK=128, BV=64, BVF=256, E=32, BC=64, BT=4,
                            BP=4, TAIL=2, SHARED=True, SURPRISE=True, READ_BLOCK=True, STEP=step, NEG=False))
    for v_first in (True, False):  # GDN's state layout and gate, DeltaNet's
        compile_kernel(read._state_kernel, dict(Q=bf, KL=bf, VS=bf, HS=bf, GS='*fp32', OUT=bf),
                       dict(C=64, G=1, K=256, V=512, BQ=64, BV=256, BKS=64, PREC='tf32', LOWP=True, V_FIRST=v_first,
                            USE_G=v_first))
    for has_pos in (False, True):
        compile_kernel(select._select_kernel, dict(ORD='*i64', POS='*i64', OUT='*i32', CNT='*i32'),
                       dict(HAS_POS=has_pos, BT=2048, BM=128))
    compile_kernel(select._chunk_sort_kernel, dict(SC='*fp32', KS='*i64'), dict(SCH=1024))
    compile_kernel(select._rank_kernel, dict(CAR='*i32', CCNT='*i32', SC='*fp32', KS='*i64', OUT='*i32'),
                   dict(BT=128, SCH=1024, NCH=8, NIT_C=11, NIT_M=11))
    for reset in (False, True):
        compile_kernel(write._store_kernel,
                       dict(IDX='*i32', KO=bf, VO=bf, SO='*fp32', PO='*i64', KN=bf, VN=bf, SN='*fp32', CK=bf, CV=bf,
                            CS='*fp32', CP='*i64', BKT=bf, BVL=bf, BS='*fp32', SEEN='*i64'),
                       dict(G=1, K=256, V=512, C=64, BK=256, BV=512, BR=16, RESET=reset))
    compile_kernel(write._row_norm_kernel, dict(X=bf, OUT='*fp32'), dict(D=512, BR=8, BD=512))


if __name__ == '__main__':
    main()

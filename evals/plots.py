"""PNG plots of evaluation results (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path


def _plt():
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


def write_plots(results: dict, out: Path) -> list[Path]:
    plt = _plt()
    out = Path(out)
    files = []
    names = list(results['models'])
    lengths = results['lengths']
    label = results['task'] + (f"-{results['phrasing']}" if results.get('phrasing') else '')
    if results['task'] == 'ppl':
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for n in names:
            ax.plot(lengths, [results['models'][n][L]['ppl'] or float('nan') for L in lengths], marker='o', label=n)
        ax.set_xscale('log', base=2), ax.set_xlabel('context length (tokens)'), ax.set_ylabel('perplexity')
        ax.legend(), ax.set_title('perplexity by context length')
        f = out / 'ppl_vs_length.png'
        fig.tight_layout(), fig.savefig(f, dpi=120), plt.close(fig)
        return [f]
    depths = results['depths']
    fig, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names) + 1, 3.5), squeeze=False)
    fig.subplots_adjust(wspace=0.45)
    for ax, n in zip(axes[0], names):
        grid = [[results['models'][n]['scores'][L][d] for L in lengths] for d in depths]
        im = ax.imshow(grid, vmin=0, vmax=1, cmap='RdYlGn', aspect='auto', origin='upper')
        ax.set_xticks(range(len(lengths)), [str(L) for L in lengths], rotation=45)
        ax.set_yticks(range(len(depths)), [f'{d:.2f}' for d in depths])
        ax.set_xlabel('context length'), ax.set_ylabel('needle depth'), ax.set_title(n)
        for i in range(len(depths)):
            for j in range(len(lengths)):
                ax.text(j, i, f'{grid[i][j]:.2f}', ha='center', va='center', fontsize=7)
    fig.colorbar(im, ax=axes[0].tolist(), label='exact-match recall')
    f = out / f"{label}_heatmap.png"
    fig.savefig(f, dpi=120, bbox_inches='tight'), plt.close(fig)
    files.append(f)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for n in names:
        s = results['models'][n]['scores']
        ax.plot(lengths, [sum(s[L].values()) / len(s[L]) for L in lengths], marker='o', label=n)
    ax.set_xscale('log', base=2), ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel('context length (tokens)'), ax.set_ylabel('recall (mean over depths)')
    ax.set_title(label), ax.legend()
    f = out / f"{label}_vs_length.png"
    fig.tight_layout(), fig.savefig(f, dpi=120), plt.close(fig)
    files.append(f)
    return files

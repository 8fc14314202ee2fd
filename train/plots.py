"""One way to finish and save the project's line plots: title, light grid, legend, tight layout, 110 dpi."""


def save_line_plot(figure, axes, path: str, title: str, *, legend_size: float | None = None) -> str:
    """Finishes `axes` of a matplotlib `figure` and writes it to `path` (PNG); returns the path."""
    axes.set_title(title)
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=legend_size)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return path

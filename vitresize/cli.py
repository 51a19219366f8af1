"""The ``vitresize`` command: parse options, call the API, hand the result to the renderer.

Exit codes: 0 success (also dry run and no-op), 1 error, 2 usage error, 130 interrupted (Ctrl-C),
143 terminated (SIGTERM; SIGHUP gives 129). Every error, usage errors included, is one ``Error:`` line on stderr.
torch is imported only inside command bodies, so ``vitresize --help`` stays fast.
"""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import sys
import threading
from collections.abc import Iterator, Sequence
from enum import Enum
from pathlib import Path
from types import FrameType
from typing import Annotated, Any, get_args

import typer

from . import _render, options
from ._version import __version__
from .errors import UsageError, VitresizeError
from .fidelity.results import COSINE_MARGIN, TOP1_MARGIN
from .keymaps import KEYMAPS
from .options import Options, Target
from .resample.conventions import METHODS, Convention

__all__ = ["app", "main"]

EPILOG = (
    "Exit codes: 0 success (also --dry-run and no-op), 1 error, 2 usage error, 130 interrupted (Ctrl-C), "
    "143 terminated (SIGTERM). "
    "Set VITRESIZE_DEBUG=1 to see tracebacks."
)


def _methods_epilog() -> str:
    """What each ``--method`` means, one line per convention (the README has the full table)."""
    groups: dict[Convention, list[str]] = {}
    for name, conv in METHODS.items():
        groups.setdefault(conv, []).append(name)
    lines = ["  native: the family's own (the default)"]
    lines += [f"  {', '.join(names)}: {conv.describe()}" for conv, names in groups.items()]
    return "Methods (--method; the README has the full table):\n" + "\n".join(lines)


def _families_epilog() -> str:
    """The ``--family`` choices, wrapped (the README's architecture table says what each converts)."""
    import textwrap

    names = "auto (from key names, the default), " + ", ".join(KEYMAPS) + "."
    return "Families (--family; the README has the architecture table):\n" + textwrap.fill(
        names, width=76, initial_indent="  ", subsequent_indent="  ", break_on_hyphens=False
    )


def _examples(*lines: str) -> str:
    return "Examples:\n" + "\n".join(f"  {line}" for line in lines)


def _hide_flag_types(command: Any, ctx: Any) -> None:
    """No ``<bool>`` after a flag in rich help (Typer prints the type of every option there, flags included):
    an empty metavar, set just before rendering so that --help and the completion options get it too."""
    for param in command.get_params(ctx):
        if isinstance(param, typer.core.TyperOption) and param.is_flag and param.metavar is None:
            param.metavar = ""


def _usage_error(e: Exception, group: typer.core.TyperGroup, args: Sequence[str]) -> str:
    """A Click usage error (unknown option, missing argument, bad choice, ...) as one line, with where to look."""
    message = str(e.format_message()).strip().rstrip(".")  # type: ignore[attr-defined]
    ctx = getattr(e, "ctx", None)
    if ctx is not None:
        where = ctx.command_path
    else:  # raised by the option parser, without a context ("Option '--img-size' requires an argument")
        where = " ".join([group.name or "vitresize", *[a for a in args if a in group.commands][:1]])
    return f"{message}; see '{where} --help'"


class _Group(typer.core.TyperGroup):
    """Typer's group, with Click's usage errors as one ``Error:`` line (exit 2) instead of a usage box."""

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        windows_expand_args: bool = True,
        **extra: Any,
    ) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, False, windows_expand_args, **extra)
        try:  # not standalone: typer.Exit's code comes back, Click's errors come up to be printed here
            code = super().main(args, prog_name, complete_var, False, windows_expand_args, **extra)
        except Exception as e:
            name = type(e).__name__
            if name == "Abort":  # Click's Ctrl-D at a prompt; vitresize never prompts
                _render.error("aborted")
                sys.exit(1)
            exit_code = getattr(e, "exit_code", None)
            if not isinstance(exit_code, int) or not hasattr(e, "format_message"):
                raise  # not Click's: a VitresizeError under VITRESIZE_DEBUG, or a bug
            if name != "NoArgsIsHelpError":  # that one has printed the help already
                _render.error(_usage_error(e, self, sys.argv[1:] if args is None else args))
            sys.exit(exit_code)
        sys.exit(code if isinstance(code, int) else 0)

    def format_help(self, ctx: Any, formatter: Any) -> None:
        _hide_flag_types(self, ctx)
        super().format_help(ctx, formatter)


class _Command(typer.core.TyperCommand):
    """Typer's command, with ``Usage: vitresize convert [OPTIONS] SRC DST`` (Typer writes ``{SRC} {DST}``)
    and no ``<bool>`` after flags in its help."""

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        return [p[1:-1] if p[:1] == "{" and p[-1:] == "}" else p for p in super().collect_usage_pieces(ctx)]

    def format_epilog(self, ctx: Any, formatter: Any) -> None:
        """Without rich (``TYPER_USE_RICH=0``) Click rewraps paragraphs: mark those of several lines (examples,
        methods) to be kept as written, as rich keeps them."""
        if self.epilog:
            paragraphs = [f"\b\n{p}" if "\n" in p else p for p in self.epilog.split("\n\n")]
            formatter.write_paragraph()
            with formatter.indentation():
                formatter.write_text("\n\n".join(paragraphs))

    def format_help(self, ctx: Any, formatter: Any) -> None:
        _hide_flag_types(self, ctx)
        super().format_help(ctx, formatter)


app = typer.Typer(
    name="vitresize",
    cls=_Group,
    help="Move a pretrained Vision Transformer checkpoint to a new input resolution or patch size.",
    epilog=EPILOG,
    no_args_is_help=True,
    add_completion=True,  # --install-completion, --show-completion; _VITRESIZE_COMPLETE=complete_bash ...
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


# str Enums of the choices (the registries', and the Literals of vitresize.options), so help and completion list them.
Family = Enum("Family", {v: v for v in ("auto", *KEYMAPS)}, type=str)  # type: ignore[misc]
Method = Enum("Method", {v: v for v in ("native", *METHODS)}, type=str)  # type: ignore[misc]
Interpolation = Enum("Interpolation", {v: v for v in get_args(options.Interpolation)}, type=str)  # type: ignore[misc]
PatchMethod = Enum("PatchMethod", {v: v for v in get_args(options.PatchMethod)}, type=str)  # type: ignore[misc]
AUTO, NATIVE, PI = Family("auto"), Method("native"), PatchMethod("pi")


GEOM = "Target geometry"
SRC_GEOM = "Source geometry (when the checkpoint cannot tell)"
CHECK_GEOM = "CONVERTED's geometry (when its weights cannot tell)"
CONV = "Resampling"
OUT = "Output"

SrcArg = Annotated[
    Path,
    typer.Argument(
        metavar="SRC", help="Checkpoint: .pth/.pt/.bin, .safetensors, .npz or a model folder.", show_default=False
    ),
]
DstArg = Annotated[
    Path,
    typer.Argument(
        metavar="DST",
        help="Output: .safetensors, .pth/.pt/.bin/.ckpt or .npz; a folder for a folder.",
        show_default=False,
    ),
]


def _size(flag: str, metavar: str, help: str, panel: str) -> Any:
    """An option taking a size (parsed by :class:`~vitresize.options.Target`)."""
    return typer.Option(flag, metavar=metavar, help=help, rich_help_panel=panel)


ImgSizeOpt = Annotated[str | None, _size("--img-size", "N|HxW", "New image size (grid = img-size / patch).", GEOM)]
PatchOpt = Annotated[str | None, _size("--patch", "N|HxW", "New patch size; alone it keeps the image size.", GEOM)]
GridOpt = Annotated[str | None, _size("--grid", "HxW", "New patch grid, instead of --img-size.", GEOM)]
WindowOpt = Annotated[str | None, _size("--window", "N|HxW", "New attention window (Swin, SAM, TinyViT).", GEOM)]
FromImgOpt = Annotated[
    str | None, _size("--from-img-size", "HxW", "Image size the checkpoint was trained at.", SRC_GEOM)
]
FromGridOpt = Annotated[str | None, _size("--from-grid", "HxW", "Patch grid of the checkpoint.", SRC_GEOM)]
# Long choice lists are spelled out in the help text (--method's in the epilog), not in the metavar: Typer
# prints them in the type column, which at 80 columns folds them mid-word and squeezes the help column.
FamilyOpt = Annotated[
    Family,
    typer.Option(
        "--family",
        metavar="FAMILY",
        help="Checkpoint layout (see Families).",
    ),
]
MethodOpt = Annotated[
    Method,
    typer.Option("--method", metavar="METHOD", help="Convention (see Methods).", rich_help_panel=CONV),
]
InterpOpt = Annotated[
    Interpolation | None,
    typer.Option(
        "--interpolation",
        metavar="MODE",
        help=f"Override mode: {', '.join(get_args(options.Interpolation))}.",
        rich_help_panel=CONV,
    ),
]
AntialiasOpt = Annotated[
    bool | None,
    typer.Option("--antialias/--no-antialias", help="Override antialiasing.", show_default=False, rich_help_panel=CONV),
]
PatchMethodOpt = Annotated[
    PatchMethod,
    typer.Option(
        "--patch-method",
        metavar="|".join(get_args(options.PatchMethod)),
        help="PI-resize (FlexiViT) or plain interpolation.",
        rich_help_panel=CONV,
    ),
]
DeviceOpt = Annotated[
    str, typer.Option("--device", metavar="DEVICE", help="cpu, cuda or cuda:N.", rich_help_panel=CONV)
]
SelectOpt = Annotated[
    str | None,
    typer.Option(
        "--select",
        metavar="NAME",
        help="State dict to write to .safetensors (default: the non-EMA model).",
        rich_help_panel=OUT,
    ),
]
ForceOpt = Annotated[bool, typer.Option("--force", "-f", help="Overwrite DST if it exists.", rich_help_panel=OUT)]
DryRunOpt = Annotated[
    bool, typer.Option("--dry-run", "-n", help="Show what would change; write nothing.", rich_help_panel=OUT)
]
JsonOpt = Annotated[
    bool, typer.Option("--json", help="One JSON object on stdout instead of the table.", rich_help_panel=OUT)
]
VerifyOpt = Annotated[
    bool,
    typer.Option(
        "--verify", help="Compare the output's pass-through tensors with the input (SHA-256).", rich_help_panel=OUT
    ),
]
FsyncOpt = Annotated[
    bool, typer.Option("--fsync", help="Flush DST to disk before exiting (slower).", rich_help_panel=OUT)
]
AllowLargeOpt = Annotated[
    bool,
    typer.Option(
        "--allow-large",
        help="Allow an output over 10x the input (and 16 MiB), or resampling over 4 GiB.",
        rich_help_panel=OUT,
    ),
]
PlotOpt = Annotated[
    Path | None,
    typer.Option(
        "--plot",
        metavar="PNG",
        help="Also draw the position-embedding similarity and the patch filters (needs vitresize\\[plot]).",
        rich_help_panel=OUT,
    ),
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors.", rich_help_panel=OUT)]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Print more detail.", rich_help_panel=OUT)]


def _version(ctx: typer.Context, value: bool) -> None:
    if value and not ctx.resilient_parsing:  # shell completion parses resiliently: print nothing then
        with _output(product=True):
            _render.line_out(f"vitresize {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Move a pretrained Vision Transformer checkpoint to a new input resolution or patch size."""


class _Terminated(KeyboardInterrupt):
    """SIGTERM/SIGHUP turned into an exception, so ``finally`` blocks remove temp files as for Ctrl-C."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise _Terminated(signum)


@contextlib.contextmanager
def _signals() -> Iterator[None]:
    """While a command runs, SIGTERM and SIGHUP unwind the stack like Ctrl-C (default: die mid-write)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = [s for s in (signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s is not None]
    previous = {s: signal.signal(s, _terminate) for s in caught}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextlib.contextmanager
def _errors() -> Iterator[None]:
    """Known errors: one ``Error:`` line and their exit code. Others keep their traceback (they are bugs)."""
    try:
        with _signals():
            yield
    except VitresizeError as e:
        if os.environ.get("VITRESIZE_DEBUG"):
            raise
        _render.error(e.cli_message())
        raise typer.Exit(e.exit_code) from None
    except KeyboardInterrupt as e:
        signum = e.signum if isinstance(e, _Terminated) else signal.SIGINT
        _render.error(f"interrupted by {signal.Signals(signum).name}; no partial output was left behind")
        raise typer.Exit(128 + signum) from None


def _plot_destination(plot: Path | None) -> None:
    """A bad ``--plot`` (suffix, folder, matplotlib missing) is refused before any work or any output."""
    if plot is not None:
        from .plot import check_destination

        check_destination(plot)


def _one_output(*, json_: bool, quiet: bool) -> None:
    if json_ and quiet:
        raise UsageError("--json and -q/--quiet contradict each other (one JSON object, or nothing); drop one")


def _input_size(src: Path) -> int:
    """Bytes of SRC for the progress bar: a regular file's size, else 0 (the API says what is wrong with it)."""
    try:
        st = src.stat()
    except (OSError, ValueError):
        return 0
    return st.st_size if stat.S_ISREG(st.st_mode) else 0


@contextlib.contextmanager
def _output(*, product: bool, written: Path | None = None) -> Iterator[None]:
    """What stdout cannot take: an error (exit 1) where the output is the product (``inspect``, ``--dry-run``),
    a warning where it only reports a file already ``written``. A reader gone away (``| head``) is no news:
    nothing is said, and only a product exits 1."""
    try:
        yield
    except _render.StdoutError as e:
        if product:
            if not e.broken_pipe:
                _render.error(f"{e}; check where stdout goes (a full disk, a closed descriptor or pipe)")
            raise typer.Exit(1) from None
        if not e.broken_pipe:
            _render.warning(f"wrote {written}, but the summary could not be printed: {e}")


@app.command(
    cls=_Command,
    epilog=_methods_epilog()
    + "\n\n"
    + _families_epilog()
    + "\n\n"
    + _examples(
        "vitresize convert vit_b16_224.pth vit_b16_384.safetensors --img-size 384",
        "vitresize convert deit.pth deit_p8.pth --patch 8 --dry-run",
        "vitresize convert vit.safetensors vit_384.safetensors --img-size 384 --json",
        "vitresize convert in.pth out.pth --from-img-size 512x768 --img-size 384",
        "vitresize convert hf_vit/ hf_vit_384/ --img-size 384    # config.json too",
        "vitresize convert vit_b16.npz vit_384.npz --img-size 384  # JAX layout kept",
    )
    + "\n\n"
    + EPILOG,
)
def convert(
    src: SrcArg,
    dst: DstArg,
    img_size: ImgSizeOpt = None,
    patch: PatchOpt = None,
    grid: GridOpt = None,
    window: WindowOpt = None,
    from_img_size: FromImgOpt = None,
    from_grid: FromGridOpt = None,
    family: FamilyOpt = AUTO,
    method: MethodOpt = NATIVE,
    interpolation: InterpOpt = None,
    antialias: AntialiasOpt = None,
    patch_method: PatchMethodOpt = PI,
    device: DeviceOpt = "cpu",
    select: SelectOpt = None,
    force: ForceOpt = False,
    dry_run: DryRunOpt = False,
    verify: VerifyOpt = False,
    fsync: FsyncOpt = False,
    allow_large: AllowLargeOpt = False,
    check: Annotated[
        bool,
        typer.Option(
            "--check",
            help="Then run 'vitresize check SRC DST' with its defaults; exit 1 if it fails.",
            rich_help_panel=OUT,
        ),
    ] = False,
    plot: PlotOpt = None,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Resample the position embedding (and patch kernel) of SRC to a new size and write DST."""
    with _errors():
        _one_output(json_=json_, quiet=quiet)
        if dry_run and (check or plot is not None):
            flag = "--check" if check else "--plot"
            raise UsageError(f"{flag} needs the output, which --dry-run does not write; drop one of them")
        _plot_destination(plot)
        target = Target(
            img_size=img_size, patch=patch, grid=grid, window=window, from_img_size=from_img_size, from_grid=from_grid
        )
        opts = Options(
            family=family.value,
            method=method.value,
            interpolation=interpolation.value if interpolation else None,
            antialias=antialias,
            patch_method=patch_method.value,
            device=device,
            allow_large=allow_large,
        )
        from . import api

        with _render.progress(_input_size(src), enabled=not (json_ or quiet or dry_run)) as bar:
            rep = api.convert(
                src,
                dst,
                target,
                opts,
                force=force,
                dry_run=dry_run,
                select=select,
                verify=verify,
                fsync=fsync,
                progress=bar,
            )
        checked, check_error = None, None
        if check and not dry_run:
            from .fidelity.check import check as run_check

            try:
                with _render.count_progress("checking", enabled=not (json_ or quiet)) as bar:
                    checked = run_check(
                        src,
                        dst,
                        family=family.value,
                        from_img_size=from_img_size,
                        from_grid=from_grid,
                        grid=rep.plan.models[0].target.grid,
                        device=device,
                        progress=bar,
                    )
            except VitresizeError as e:
                check_error = e
        if plot is not None and not dry_run:
            from .fidelity.pictures import plot_check, plot_checkpoints

            if checked is not None:
                plot_check(plot, checked, family=family.value)
            else:
                m = rep.plan.models[0]
                plot_checkpoints(
                    plot,
                    [("before", src), ("after", dst)],
                    title=f"vitresize convert: {src.name} -> {dst.name}",
                    family=family.value,
                    from_grid=m.source.grid if m.embedding.grid_known else None,
                )
        with _output(product=dry_run, written=dst):
            if json_:
                d = rep.to_dict()
                if checked is not None:
                    d["check"] = checked.to_dict()
                _render.json_out(d)
            elif not quiet:
                _render.report(rep, verbose=verbose)
                if checked is not None:
                    _render.check_report(checked, verbose=verbose)
        if not quiet:
            for w in rep.warnings:
                _render.warning(w)
            _render.left_out(rep)
            if verbose and rep.plan.src_format == "torch-legacy":
                _render.info(
                    "legacy (non-zip) torch pickle: it was loaded whole; re-save it with torch.save for lazy reads"
                )
            if checked is not None:
                _check_messages(checked)
        if check_error is not None:
            _render.error(f"wrote {dst}, but the check could not run: {check_error.cli_message()}")
            raise typer.Exit(1)
        if checked is not None and not checked.ok:
            _render.error(f"wrote {dst}, but it does not pass the check: {_failure(checked)}")
            raise typer.Exit(1)


@app.command(
    cls=_Command,
    epilog=_examples("vitresize inspect vit_b16_224.pth", "vitresize inspect model.safetensors --json")
    + "\n\n"
    + _families_epilog()
    + "\n\n"
    + EPILOG.replace(" (also --dry-run and no-op)", ""),
)
def inspect(
    src: SrcArg,
    family: FamilyOpt = AUTO,
    from_img_size: FromImgOpt = None,
    from_grid: FromGridOpt = None,
    plot: PlotOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Show a checkpoint's format, nesting, tensors, and its ViT embeddings and geometry."""
    with _errors():
        from . import api

        _plot_destination(plot)
        ins = api.inspect(src, family=family.value, from_img_size=from_img_size, from_grid=from_grid)
        if plot is not None:
            from .fidelity.pictures import plot_checkpoints

            plot_checkpoints(
                plot,
                [("", src)],
                title=f"vitresize inspect: {src.name}",
                family=family.value,
                from_img_size=from_img_size,
                from_grid=from_grid,
            )
        with _output(product=True):
            if json_:
                _render.json_out(ins.to_dict())
            else:
                _render.inspection(ins)
        if not json_:
            for w in ins.warnings:
                _render.warning(w)


def _failure(rep: Any) -> str:
    """Why a check failed, in one line."""
    for side, name in ((rep.original, "ORIGINAL"), (rep.converted, "CONVERTED")):
        if not side.load.ok:
            return f"{name} does not load strictly into {side.architecture.name} ({side.load.describe()})"
    failed = [g.text for g in rep.gates if not g.ok]
    return "; ".join(failed) + " (see the table; gates are documented in 'vitresize check --help')"


def _check_messages(rep: Any) -> None:
    for w in rep.warnings:
        _render.warning(w)
    for s in rep.skipped:
        _render.warning(f"skipped {s.path}: {s.reason}")


MethodsOpt = Annotated[
    str,
    typer.Option(
        "--methods",
        metavar="default|all|M,M",
        help="Also compare these conversion methods (made in memory), ranked; 'all': every method.",
    ),
]


@app.command(
    cls=_Command,
    epilog="Gates (exit 1 when one fails): the original is converted in memory by vitresize's default method to "
    f"CONVERTED's geometry (the reference); CONVERTED must agree with the original about as well: its mean "
    f"cosine similarity (pooled and patch features) at most {COSINE_MARGIN} lower, its top-1 agreement at most "
    f"{TOP1_MARGIN:g} points lower than the reference's. --min-agreement and --min-cosine add absolute gates.\n\n"
    + _examples(
        "vitresize check vit.pth vit_384.safetensors",
        "vitresize check vit.pth vit_384.pth --images photos/ --limit 200",
        "vitresize check vit.pth vit_384.pth --methods all --plot check.png",
        "vitresize check hf_vit/ hf_vit_384/ --json --min-agreement 90",
    )
    + "\n\n"
    + "Exit codes: 0 every gate holds, 1 a strict load or a gate failed (or an error), 2 usage error, "
    "130 interrupted. Set VITRESIZE_DEBUG=1 to see tracebacks.",
)
def check(
    original: Annotated[
        Path, typer.Argument(metavar="ORIGINAL", help="The checkpoint before conversion.", show_default=False)
    ],
    converted: Annotated[
        Path, typer.Argument(metavar="CONVERTED", help="The converted checkpoint (by any tool).", show_default=False)
    ],
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            metavar="NAME",
            help="The model's name in its library (timm, open_clip, torchvision name; transformers class), "
            "where no config.json tells it and the weights cannot.",
        ),
    ] = None,
    images: Annotated[
        Path | None,
        typer.Option(
            "--images",
            metavar="DIR",
            help="Images to compare on (recursively, any format Pillow reads); default: scikit-image's photographs.",
        ),
    ] = None,
    limit: Annotated[int | None, typer.Option("--limit", metavar="N", help="Use at most N images.")] = None,
    methods: MethodsOpt = "default",
    min_agreement: Annotated[
        float | None,
        typer.Option("--min-agreement", metavar="PCT", help="Fail below this top-1 agreement (percent)."),
    ] = None,
    min_cosine: Annotated[
        float | None,
        typer.Option("--min-cosine", metavar="X", help="Fail below this pooled-feature cosine similarity."),
    ] = None,
    family: FamilyOpt = AUTO,
    from_img_size: FromImgOpt = None,
    from_grid: FromGridOpt = None,
    img_size: Annotated[
        str | None,
        _size("--img-size", "N|HxW", "CONVERTED's image size, where its weights cannot tell it.", CHECK_GEOM),
    ] = None,
    grid: Annotated[
        str | None, _size("--grid", "HxW", "CONVERTED's patch grid, instead of --img-size.", CHECK_GEOM)
    ] = None,
    device: DeviceOpt = "cpu",
    plot: PlotOpt = None,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Prove that CONVERTED still works: build both with their library, load strictly, compare on images."""
    with _errors():
        _one_output(json_=json_, quiet=quiet)
        _plot_destination(plot)
        from .fidelity.check import check as run_check

        with _render.count_progress("checking", enabled=not (json_ or quiet)) as bar:
            rep = run_check(
                original,
                converted,
                model=model,
                images=images,
                limit=limit,
                methods=methods,
                device=device,
                min_agreement=min_agreement,
                min_cosine=min_cosine,
                family=family.value,
                from_img_size=from_img_size,
                from_grid=from_grid,
                img_size=img_size,
                grid=grid,
                progress=bar,
            )
        if plot is not None:
            from .fidelity.pictures import plot_check

            plot_check(plot, rep, family=family.value)
        with _output(product=True):
            if json_:
                _render.json_out(rep.to_dict())
            elif not quiet:
                _render.check_report(rep, verbose=verbose)
        if not json_ and not quiet:
            _check_messages(rep)
        if not rep.ok:
            if not json_:
                _render.error(f"check failed: {_failure(rep)}")
            raise typer.Exit(1)


BATCH_MANIFEST = (
    "Manifest: JSON lines (.jsonl, one object per line) or CSV (.csv, a header row); '#' lines and blank lines "
    "are skipped. Keys: src, dst (relative to the manifest's folder) and convert's options named as in Python: "
    "img_size, patch, grid, window, from_img_size, from_grid, family, method, interpolation, antialias, "
    "patch_method, device, allow_large, force, select, verify, fsync (flags: true/false; an empty CSV cell leaves "
    "a key unset). The whole manifest is checked before anything runs."
)


@app.command(
    cls=_Command,
    epilog=BATCH_MANIFEST
    + "\n\n"
    + _examples(
        "vitresize batch manifest.jsonl --jobs 2",
        "vitresize batch manifest.csv --json > report.json",
        "vitresize batch manifest.jsonl --resume         # rerun: skip what is done",
        "# Slurm: sbatch --array=0-15 ...; each task runs",
        "vitresize batch manifest.jsonl --resume --shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT",
        "# Kubernetes indexed Job (completions: 8, completionMode: Indexed):",
        "vitresize batch manifest.jsonl --resume --shard $JOB_COMPLETION_INDEX/8",
    )
    + "\n\n"
    + "Exit codes: 0 every line converted or skipped, 1 a line failed (the others still ran, unless --fail-fast), "
    "2 usage error (the manifest: nothing ran), 130 interrupted (Ctrl-C: lines under way finish or leave nothing). "
    "Set VITRESIZE_DEBUG=1 to see tracebacks.",
)
def batch(
    manifest: Annotated[
        Path,
        typer.Argument(metavar="MANIFEST", help="Conversions, one per line: JSON lines or CSV.", show_default=False),
    ],
    jobs: Annotated[int, typer.Option("--jobs", "-j", metavar="N", help="Run N conversions at a time.")] = 1,
    shard: Annotated[
        str | None,
        typer.Option("--shard", metavar="K/N", help="Run only entries i (from 0) with i % N == K: one of N machines."),
    ] = None,
    resume: Annotated[
        bool,
        typer.Option("--resume", help="Skip a line whose DST exists and matches what it would write."),
    ] = False,
    keep_going: Annotated[
        bool,
        typer.Option(
            "--keep-going/--fail-fast",
            help="After a failed line, run the others (default), or start no more.",
            show_default=False,
        ),
    ] = True,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Run the conversions of a manifest in one process: a table (or one JSON object) with a row per line."""
    with _errors():
        _one_output(json_=json_, quiet=quiet)
        from . import batch as batches

        with _render.count_progress("converting", enabled=not (json_ or quiet)) as bar:
            rep = batches.run(manifest, jobs=jobs, shard=shard, resume=resume, fail_fast=not keep_going, progress=bar)
        try:
            if json_:
                _render.json_out(rep.to_dict())
            elif not quiet:
                _render.batch_report(rep)
        except _render.StdoutError as e:
            if not e.broken_pipe:
                _render.warning(f"ran {manifest}, but its report could not be printed: {e}")
        for r in rep.lines:
            if not quiet and r.report is not None:
                for w in r.report.warnings:
                    _render.warning(f"line {r.line.number}: {w}")
            if quiet and r.error is not None:
                _render.error(f"line {r.line.number} ({r.line.src} -> {r.line.dst}): {r.error}")
        if not rep.ok:
            if not quiet:
                numbers = ", ".join(str(r.line.number) for r in rep.failed)
                where = 'the JSON\'s "lines"' if json_ else "the table"
                _render.error(f"{len(rep.failed)} of {len(rep.lines)} lines failed (line {numbers}); see {where}")
            raise typer.Exit(1)


def _reserve_std_fds() -> None:
    """Open /dev/null on a closed descriptor 0, 1 or 2 (``>&-``), so that no file vitresize opens (the source, the
    output) can become stdout or stderr and receive stray writes. ``sys.stdout`` stays ``None``: the output then
    reports stdout as closed."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)


def main() -> None:
    """Console-script entry point (also ``python -m vitresize``).

    Where stdout cannot take the output (closed with ``>&-``, on a full device, a pipe whose reader has gone):

    - ``convert``: DST is written, so its summary (table or ``--json``) is best effort: one ``Warning:`` line on
      stderr says it could not be printed and why, and the exit status stays 0.
    - ``inspect``, ``convert --dry-run`` and ``--version``, whose output is the product: one
      ``Error: cannot write to stdout: ...`` line and exit 1.
    - A closed pipe (EPIPE, ``| head -c1``) is the reader's choice, not news: nothing is printed; the exit
      status is 1 where the output is the product, as above, and 0 for ``convert``.

    An encoding that is not UTF (``PYTHONIOENCODING=ascii``) is no error: tables get ASCII boxes and characters
    it cannot encode are backslash-escaped. stderr closed or broken is never an error: messages are dropped.

    Once torch is loaded, the process ends with ``os._exit`` after flushing stdout and stderr: the output
    is complete and renamed into place by then, and tearing torch down costs ~0.4 s (10% of converting a
    4 GB file) for nothing. Without torch (``--help``, ``inspect`` of a safetensors file) it exits normally.
    """
    _reserve_std_fds()
    code = 0
    try:
        app(standalone_mode=True)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if "torch" not in sys.modules:
            raise
    if "torch" not in sys.modules:
        return
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)

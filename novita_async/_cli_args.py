"""The command line's words: constants, exit statuses, the argument parser, prompts and requests.

Everything here is checked before anything runs; bad input is a usage error
(exit status 2, one line).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit

import attrs

from ._client import DEFAULT_BASE_URL
from ._errors import InvalidRequestError
from ._models import Txt2ImgRequest
from ._version import __version__

__all__ = [
    "DEMO_PROMPTS",
    "DEMO_SIZE",
    "EXIT_AUTH",
    "EXIT_FAILURES",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_UNREACHABLE",
    "EXIT_USAGE",
    "PROG",
    "UsageError",
    "build_parser",
    "build_requests",
    "listen_address",
    "plural",
    "read_prompts",
]

PROG = "novita-async"
DEFAULT_MODEL = "sd_xl_base_1.0.safetensors"
DEMO_MODEL = "sd_xl_base_1.0.safetensors"
DEMO_PROMPTS = (
    "a red fox curled up in fresh snow, morning light",
    "a lighthouse on a basalt cliff during a storm",
    "isometric cutaway of a tiny bakery, pastel colours",
    "an astronaut tending a greenhouse on mars",
    "a bowl of ramen, steam rising, studio photo",
    "a watercolor map of an imaginary archipelago",
    "a cyberpunk alley at night, neon reflections in puddles",
    "a cozy reading nook with a sleeping cat",
    "an ancient library carved into a mountain",
    "a hot air balloon festival over lavender fields",
    "a koi pond seen from above, autumn leaves on the water",
    "a steam locomotive crossing a stone viaduct",
)
DEMO_FAILING_PROMPT = "a prompt the emulator rejects [fail]"
DEMO_SIZE = 256  # demo pictures are drawn by the emulator: keep them small and fast

EXIT_OK, EXIT_FAILURES, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
#: The API refused the key (401/403): the batch stopped at the first such answer.
EXIT_AUTH = 3
#: The API host could not be reached before any task was created.
EXIT_UNREACHABLE = 4

EXIT_STATUS_HELP = """\
exit status:
  0    every prompt succeeded and every image was saved
  1    some prompt or image download failed (each is listed in the summary)
  2    usage error (bad option, --out is a file, journal of another batch, ...)
  3    the API refused the key (401/403); the batch stops at the first refusal
  4    the API host cannot be reached (before any task was created)
  130  interrupted (Ctrl-C); with --journal, rerun the same command to resume
"""


class UsageError(Exception):
    """Bad command-line input found after parsing (exit status 2)."""


def plural(count: int, word: str) -> str:
    """``1 prompt``, ``2 prompts``, ``0 images``."""
    return f"{count} {word}{'' if count == 1 else 's'}"


# --------------------------------------------------------------------------- argument types


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def listen_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) -> ``(host, port)``; port 0 picks a free one.

    Raises :class:`UsageError` (one line, exit status 2) for anything else.
    """
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        colon, port_text = rest[:1], rest[1:]
        ok = bool(bracket) and colon == ":"
    else:
        host, colon, port_text = text.rpartition(":")
        ok = bool(colon) and ":" not in host
    if not ok or not host:
        raise UsageError(f"--webhook-listen must be HOST:PORT (e.g. 127.0.0.1:8787), got {text!r}")
    if not (port_text.isascii() and port_text.isdigit()) or int(port_text) > 65535:
        raise UsageError(f"--webhook-listen: the port must be 0-65535, got {port_text!r}")
    return host, int(port_text)


def _http_url(text: str) -> str:
    parts = urlsplit(text)
    try:
        parts.port  # noqa: B018 - raises ValueError for a port out of range
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid port in {text!r}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise argparse.ArgumentTypeError(f"must be an http(s) URL, got {text!r}")
    return text


def _request_default(name: str) -> object:
    """The default of a :class:`Txt2ImgRequest` field (help shows the models' own values)."""
    return getattr(attrs.fields(Txt2ImgRequest), name).default


# --------------------------------------------------------------------------- the parser


def _common_run_options(parser: argparse.ArgumentParser, *, default_out: str) -> None:
    parser.add_argument(
        "--out",
        metavar="DIR",
        type=Path,
        default=None,
        help=f"directory the images are saved to, created if missing (default: {default_out})",
    )
    parser.add_argument(
        "--concurrency",
        metavar="N",
        type=_positive_int,
        default=8,
        help="submissions in flight at once (default: %(default)s)",
    )
    parser.add_argument(
        "--download-concurrency",
        metavar="N",
        type=_positive_int,
        default=8,
        help="images downloaded at once (default: %(default)s)",
    )
    parser.add_argument(
        "--no-progress",
        action="store_true",
        help="do not show the progress bar on stderr (default: shown)",
    )
    parser.add_argument(
        "--backend",
        choices=("asyncio", "trio"),
        default="asyncio",
        help="async backend to run on; trio must be installed (default: %(default)s)",
    )


def _webhook_options(gen: argparse.ArgumentParser) -> None:
    group = gen.add_argument_group(
        "webhooks",
        "Novita can POST each task's result to a URL of yours: with --webhook-listen the\n"
        "run waits on those deliveries instead of polling (one confirming GET per task; a\n"
        "lost delivery is caught by a late poll). Novita must reach the URL: behind NAT or\n"
        "on a laptop, run a tunnel (ngrok, cloudflared, ...) to --webhook-listen's\n"
        "HOST:PORT and pass the tunnel's public URL as --webhook-url.",
    )
    group.add_argument(
        "--webhook-url",
        metavar="URL",
        type=_http_url,
        help="public URL Novita POSTs each task's result to, e.g. https://abc.ngrok.app/hook; "
        "without --webhook-listen they go to a receiver of yours and the run polls as usual "
        "(default: none)",
    )
    group.add_argument(
        "--webhook-listen",
        metavar="HOST:PORT",
        help="receive the deliveries on this local address while the run lasts (any path, "
        "POST only; needs --webhook-url reaching it, e.g. through a tunnel) (default: none: "
        "results are polled)",
    )


def build_parser() -> argparse.ArgumentParser:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Generate images with Novita AI's v3 async txt2img API.",
        epilog="Start with `novita-async demo`: it needs no API key and no network.\n\n"
        + EXIT_STATUS_HELP,
        formatter_class=formatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    gen = commands.add_parser(
        "generate",
        help="generate one image set per prompt and save every image",
        description=(
            "Submit every prompt to Novita, save every image under --out as soon as its task "
            "finishes, then print a summary. The API key comes from --api-key or NOVITA_API_KEY "
            "(prefer the variable: command lines are visible to other users). Request options "
            "left out use Novita's defaults, shown below."
        ),
        epilog=EXIT_STATUS_HELP,
        formatter_class=formatter,
    )
    gen.add_argument("prompts", nargs="*", metavar="PROMPT", help="prompts (or use --prompts-file)")
    gen.add_argument(
        "--prompts-file",
        metavar="FILE",
        help="read prompts from FILE, one per line ('-' for stdin; blank and # lines skipped)",
    )
    gen.add_argument(
        "--model", default=DEFAULT_MODEL, help="checkpoint sd_name (default: %(default)s)"
    )
    gen.add_argument("--negative-prompt", metavar="TEXT", help="what to avoid (default: none)")
    for option, kind, what in (
        ("width", int, "image width in pixels"),
        ("height", int, "image height in pixels"),
        ("steps", int, "denoising steps"),
        ("guidance-scale", float, "how closely to follow the prompt"),
        ("image-num", int, "images per prompt"),
    ):
        default = _request_default(option.replace("-", "_"))
        gen.add_argument(f"--{option}", type=kind, help=f"{what} (default: {default})")
    gen.add_argument(
        "--sampler",
        metavar="NAME",
        help=f"sampler name (default: {_request_default('sampler_name')})",
    )
    gen.add_argument("--seed", type=int, help="seed; -1 is random (default: -1)")
    gen.add_argument(
        "--image-type",
        choices=("png", "webp", "jpeg"),
        help="image file type Novita returns (default: png)",
    )
    gen.add_argument(
        "--images-per-minute",
        metavar="IPM",
        type=_positive_float,
        help=(
            "pace submissions to this many images per minute (default: unpaced: as fast as "
            "--concurrency allows, slowing down at the first 429). Novita's default quota "
            "for txt2img is 20 images per minute"
        ),
    )
    gen.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=_positive_float,
        help="give up waiting for a task's result after this long (default: no limit)",
    )
    gen.add_argument(
        "--journal",
        metavar="PATH",
        help=(
            "sqlite journal file: rerunning the same command with the same journal resumes "
            "(after Ctrl-C or a crash) without paying twice (default: none)"
        ),
    )
    gen.add_argument(
        "--resubmit-uncertain",
        action="store_true",
        help="resubmit prompts whose earlier submission outcome is unknown (may pay twice)",
    )
    gen.add_argument("--api-key", help="Novita API key (default: $NOVITA_API_KEY)")
    gen.add_argument(
        "--base-url",
        type=_http_url,
        default=DEFAULT_BASE_URL,
        help=(
            "API base URL, e.g. the loopback emulator's "
            "(`python -m novita_async.testing`) (default: %(default)s)"
        ),
    )
    _common_run_options(gen, default_out="out")
    _webhook_options(gen)

    demo = commands.add_parser(
        "demo",
        help="run `generate` on the built-in emulator: no API key, no network",
        description=(
            f"Generate {len(DEMO_PROMPTS)} pictures ({DEMO_SIZE}x{DEMO_SIZE}, drawn from each "
            "task's seed) on the in-process emulator of the Novita API (novita_async.testing) "
            "and save them under --out. Nothing leaves this process."
        ),
        epilog=EXIT_STATUS_HELP,
        formatter_class=formatter,
    )
    demo.add_argument(
        "--with-failure",
        action="store_true",
        help="add a prompt the emulator fails, to show how failures are reported",
    )
    demo.add_argument(
        "--durations",
        nargs=2,
        metavar=("MIN", "MAX"),
        type=float,
        default=(0.5, 2.0),
        help="emulated task durations in seconds (default: 0.5 2.0)",
    )
    demo.add_argument("--seed", type=int, default=0, help="emulator random seed (default: 0)")
    _common_run_options(demo, default_out="a new temporary directory, printed")
    return parser


# --------------------------------------------------------------------------- prompts, requests


def read_prompts(prompts: Sequence[str], prompts_file: str | None) -> list[str]:
    """Prompts from the arguments, then from the file (blank and ``#`` lines skipped)."""
    collected = [p.strip() for p in prompts if p.strip()]
    if prompts_file is not None:
        try:
            if prompts_file == "-":
                text = sys.stdin.read()
            else:
                text = Path(prompts_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"cannot read prompts file: {exc}") from exc
        # A UTF-8 BOM (Notepad writes one) is not part of the first prompt or comment.
        for line in text.removeprefix("\ufeff").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                collected.append(line)
    if not collected:
        raise UsageError("no prompts: pass them as arguments or with --prompts-file")
    return collected


def build_requests(args: argparse.Namespace, prompts: Sequence[str]) -> list[Txt2ImgRequest]:
    options = {
        "negative_prompt": args.negative_prompt,
        "width": args.width,
        "height": args.height,
        "steps": args.steps,
        "guidance_scale": args.guidance_scale,
        "sampler_name": args.sampler,
        "seed": args.seed,
        "image_num": args.image_num,
    }
    given = {key: value for key, value in options.items() if value is not None}
    try:
        return [Txt2ImgRequest(model_name=args.model, prompt=p, **given) for p in prompts]
    except InvalidRequestError as exc:
        raise UsageError(str(exc)) from exc

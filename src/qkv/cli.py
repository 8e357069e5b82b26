"""The `qkv` command line. Each command lives in its module as two plain functions:
`add_arguments(parser)` and `run(args) -> int`; modules are imported only when used."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# name -> (module, help). Handlers are `<module>.add_<name>_arguments` and `<module>.run_<name>`
# with dashes in the name turned into underscores.
COMMANDS: dict[str, tuple[str, str]] = {
    "data": ("qkv.data", "download or copy corpora (Multi30k)"),
    "train": ("qkv.train", "train a model from a TOML config"),
    "average": ("qkv.train", "average the weights of the last k checkpoints"),
    "uptrain": ("qkv.convert", "continue training a (converted) language model on a text file"),
    "translate": ("qkv.translate", "translate stdin to stdout with an encoder-decoder"),
    "evaluate": ("qkv.evaluate", "BLEU and chrF of a translation model on a test set"),
    "generate": ("qkv.generate", "generate text with a language model"),
    "perplexity": ("qkv.generate", "perplexity of a language model on a text file"),
    "convert": ("qkv.convert", "convert a model to fewer key/value heads (GQA/MQA)"),
    "classify": ("qkv.classify", "classify stdin lines with a classifier"),
    "attention-map": ("qkv.visualize", "draw attention heatmaps to a PNG"),
    "bench": ("qkv.bench", "run benchmarks"),
    "demo": ("qkv.demo", "load SmolLM2, convert it to MQA, and compare"),
}


class CLIError(ValueError):
    """Bad command-line input: printed as `qkv: error: ...`, exit status 2."""


def _handler(name: str, prefix: str):
    module = importlib.import_module(COMMANDS[name][0])
    suffix = "_arguments" if prefix == "add_" else ""
    return getattr(module, f"{prefix}{name.replace('-', '_')}{suffix}")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only `command`'s module is imported (all of them when None)."""
    parser = argparse.ArgumentParser(prog="qkv", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_)
        if command in (None, name):
            _handler(name, "add_")(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else None)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        status = int(_handler(args.command, "run_")(args) or 0)
        sys.stdout.flush()  # so that a closed pipe shows here, not at exit
        return status
    except (ValueError, FileNotFoundError) as e:
        print(f"qkv: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qkv: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of stdout has gone, e.g. `qkv translate | head -1`
        _silence_stdout()
        return 1


def _silence_stdout() -> None:
    """Point stdout at devnull, so that Python's flush at exit does not fail again on the
    closed pipe (the Python docs' note on SIGPIPE, in the signal module)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is no file (tests): nothing will flush to it
        pass


if __name__ == "__main__":
    sys.exit(main())

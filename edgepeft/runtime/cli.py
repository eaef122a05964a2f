"""`edgepeft run` and `edgepeft chat`: the device engine from the command line (no torch).

    edgepeft run EXPORT_DIR [--adapter NAME|FILE] --prompt TEXT [--stream] [sampling] [--threads N]
        Engine(EXPORT_DIR) ──► generate / stream(prompt, adapter) ──► stdout
    edgepeft chat EXPORT_DIR [--adapter NAME|FILE] [sampling]
        stdin, line by line (a terminal or a pipe):
            text          a user turn ──► the reply, streamed to stdout
            /adapter NAME switch adapter for the next turns (/adapter none: the base);
                          the history is kept
            /adapters     list the loaded adapters
            /reset        forget the history
            /quit, EOF    leave
        the export's chat template renders the history when it has one; else the history is
        plain text ("User: ...\\nAssistant: ...") the model continues (said once on stderr)

Also `eval_export`, which `edgepeft eval` calls when MODEL is an export folder.
Imports stay light: onnxruntime loads when a command opens the Engine (engine.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from edgepeft.artifacts.manifest import FORMAT, manifest_path
from edgepeft.evaluation.examples import read_examples
from edgepeft.evaluation.report import print_report
from edgepeft.runtime.engine import Engine
from edgepeft.runtime.evaluate import evaluate
from edgepeft.vocab import ADAPTER_SUFFIXES

NONE = "none"
USER, ASSISTANT = "User: ", "Assistant:"
"""Turn labels of a plain-text conversation (exports whose tokenizer has no chat template)."""


def add_parser(commands) -> None:
    run = commands.add_parser(
        "run",
        help="generate from an exported model with the device runtime (no torch)",
        description="Open an export folder with edgepeft.runtime.Engine (onnxruntime, numpy, "
        "tokenizers) and continue one prompt, with the base or one adapter.",
    )
    _common(run)
    run.add_argument("--prompt", required=True, metavar="TEXT", help="text to continue")
    run.add_argument("--stream", action="store_true", help="print text as it is generated")
    run.add_argument("--stop", action="append", default=None, metavar="TEXT",
                     help="stop before this text (repeatable)")
    run.add_argument("--ignore-eos", action="store_true",
                     help="generate exactly --max-new-tokens tokens (eos does not end it)")
    run.set_defaults(run=_run)

    chat = commands.add_parser(
        "chat",
        help="chat with an exported model, switching adapters mid-conversation",
        description="An interactive conversation read from stdin line by line (a pipe works). "
        "Commands: /adapter NAME (/adapter none for the base), /adapters, /reset, /quit. "
        "Uses the export's chat template, or plain 'User:/Assistant:' text when it has none.",
    )
    _common(chat)
    chat.add_argument("--system", metavar="TEXT", help="system message (chat templates only)")
    chat.set_defaults(run=_chat)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("export_dir", metavar="EXPORT_DIR", help="folder written by edgepeft export")
    parser.add_argument(
        "--adapter",
        metavar="NAME|FILE",
        help="a loaded adapter's name (the export's adapters are loaded), or an adapter file "
        "(*.onnx_adapter, *.kvprefix.safetensors) to load; default: the base alone",
    )
    parser.add_argument("--max-new-tokens", type=int, default=128, metavar="N", help="default: 128")
    parser.add_argument("--temperature", type=float, default=0.0, metavar="T",
                        help="0 (default) is greedy")
    parser.add_argument("--top-k", type=int, default=0, metavar="K", help="default: 0 (off)")
    parser.add_argument("--top-p", type=float, default=1.0, metavar="P", help="default: 1.0 (off)")
    parser.add_argument("--repetition-penalty", type=float, default=1.0, metavar="R",
                        help="default: 1.0 (off)")
    parser.add_argument("--seed", type=int, metavar="S", help="seed for sampling")
    parser.add_argument("--threads", type=int, metavar="N", help="onnxruntime intra-op threads")
    parser.add_argument("--device", metavar="PROFILE",
                        help="device profile (name or .toml path): providers, threads")


# ---------------------------------------------------------------- shared


def _open(args: argparse.Namespace):
    """(engine, adapter name or None) for the command's EXPORT_DIR and --adapter."""
    folder = Path(args.export_dir)
    if not folder.is_dir():
        raise ValueError(f"export folder {folder} does not exist")
    engine = _engine(folder, threads=args.threads, device=args.device)
    return engine, _adapter(engine, args.adapter)


def _engine(folder: Path, **options) -> Engine:
    """Engine(folder, **options), each adapter that failed to load said on stderr."""
    engine = Engine(folder, **options)
    for name, error in engine.load_errors.items():
        print(f"warning: adapter {name!r} was not loaded: {error}", file=sys.stderr)
    return engine


def _adapter(engine, value: str | None) -> str | None:
    """A loaded adapter's name; a file path is loaded first. Unknown names list the loaded."""
    if value is None or value == NONE:
        return None
    if value.endswith(ADAPTER_SUFFIXES):
        path = Path(value)
        if not path.is_file():
            raise ValueError(f"adapter file {path} does not exist")
        name = next((n for n, i in engine.adapters().items() if Path(i.file).resolve() == path.resolve()), None)
        return name or engine.load_adapter(path).name
    if value not in engine.adapters():
        loaded = ", ".join(sorted(engine.adapters())) or "none"
        raise ValueError(
            f"no adapter named {value!r} in {engine.export_dir} (loaded: {loaded}); "
            "name one of these, give an adapter file, or leave --adapter out for the base"
        )
    return value


def _sampling(args: argparse.Namespace) -> dict:
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    return dict(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
    )


# ---------------------------------------------------------------- run


def _run(args: argparse.Namespace) -> int:
    engine, adapter = _open(args)
    options = dict(adapter=adapter, stop=args.stop, ignore_eos=args.ignore_eos, **_sampling(args))
    if args.stream:
        for piece in engine.stream(args.prompt, **options):
            print(piece, end="", flush=True)
        print()
    else:
        print(engine.generate(args.prompt, **options))
    return 0


# ---------------------------------------------------------------- chat


class Conversation:
    """The history of one chat and how it becomes the next prompt."""

    def __init__(self, templated: bool, system: str | None = None):
        self.templated = templated
        self.system = system
        self.turns: list[dict] = []

    def reset(self) -> None:
        self.turns = []

    def prompt(self, user: str):
        """The prompt for the reply to `user`: messages (template) or the transcript text."""
        turns = [*self.turns, {"role": "user", "content": user}]
        if self.templated:
            head = [{"role": "system", "content": self.system}] if self.system else []
            return head + turns
        lines = [f"{USER}{t['content']}" if t["role"] == "user" else f"{ASSISTANT} {t['content']}"
                 for t in turns]
        return "\n".join(lines) + f"\n{ASSISTANT}"

    @property
    def stops(self) -> list[str] | None:
        """Plain text: the model writing the next user turn ends its reply."""
        return None if self.templated else [f"\n{USER.strip()}"]

    def add(self, user: str, reply: str) -> None:
        self.turns += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]


def _chat(args: argparse.Namespace) -> int:
    engine, adapter = _open(args)
    sampling = _sampling(args)
    templated = bool(engine.codec.chat_template)
    if not templated:
        print(
            f"note: {engine.export_dir} has no chat template; the conversation is plain "
            f"'{USER.strip()} / {ASSISTANT}' text the model continues",
            file=sys.stderr,
        )
        if args.system:
            print("note: --system is ignored without a chat template", file=sys.stderr)
    conversation = Conversation(templated, args.system)
    interactive = sys.stdin.isatty()
    print(f"chatting with {engine.export_dir} ({_label(adapter)}); /adapter NAME, /adapters, "
          "/reset, /quit", file=sys.stderr)
    while True:
        if interactive:
            print(f"[{_label(adapter)}] > ", end="", flush=True, file=sys.stderr)
        line = sys.stdin.readline()
        if not line:  # EOF
            break
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            command, _, argument = text.partition(" ")
            if command == "/quit":
                break
            adapter = _command(engine, conversation, adapter, command, argument.strip())
            continue
        reply = ""
        try:
            for piece in engine.stream(conversation.prompt(text), adapter=adapter,
                                       stop=conversation.stops, truncate=True, **sampling):
                reply += piece
                print(piece, end="", flush=True)
        except ValueError as e:  # a bad turn ends the turn, not the chat
            print(f"\nerror: {e}", file=sys.stderr)
            continue
        print(flush=True)
        conversation.add(text, reply.strip())
    return 0


def _label(adapter: str | None) -> str:
    return f"adapter {adapter}" if adapter else "base, no adapter"


def _command(engine, conversation: Conversation, adapter: str | None, command: str, argument: str):
    """Run one /command; returns the adapter in use after it. Mistakes print and keep going."""
    if command == "/adapters":
        infos = engine.adapters()
        for name, info in infos.items():
            rank = f", rank {info.rank}" if info.rank else ""
            mark = "*" if name == adapter else " "
            print(f"{mark} {name} ({info.kind}{rank}, {info.bytes / 1024:.1f} KiB)")
        print(f"{'*' if adapter is None else ' '} {NONE} (the base alone)")
        return adapter
    if command == "/reset":
        conversation.reset()
        print("history cleared")
        return adapter
    if command == "/adapter":
        if not argument:
            print(f"usage: /adapter NAME (or /adapter {NONE}); now: {_label(adapter)}")
            return adapter
        try:
            adapter = _adapter(engine, argument)
        except (ValueError, OSError) as e:
            print(f"error: {e}")
            return adapter
        print(f"now: {_label(adapter)}")
        return adapter
    print(f"unknown command {command!r}; commands: /adapter NAME, /adapters, /reset, /quit")
    return adapter


# ---------------------------------------------------------------- eval on an export


def is_export_folder(path: str | Path) -> bool:
    """True for a folder `edgepeft export` wrote (a manifest of format edgepeft-onnx)."""
    manifest = manifest_path(Path(path).expanduser())
    if manifest is None:
        return False
    try:
        return json.loads(manifest.read_text()).get("format") == FORMAT
    except (ValueError, OSError):
        return False


def eval_export(args: argparse.Namespace) -> int:
    """`edgepeft eval EXPORT_DIR --data TEST.jsonl [--adapter NAME|FILE ...]` on the engine."""
    if args.quant is not None:
        raise ValueError(f"--quant applies to HF model folders; {args.model} is an export "
                         "(its weights are fixed at export time)")
    if not Path(args.data).is_file():
        raise ValueError(f"--data {args.data} is not a file (expected a JSONL test set)")
    read_examples(args.data)  # bad rows fail before the session loads
    engine = _engine(Path(args.model).expanduser())
    names = [_adapter(engine, value) for value in args.adapter] if args.adapter else None
    if names is not None and None in names:
        raise ValueError(f"--adapter {NONE} is the base row, which is in the table unless --no-base")
    report = evaluate(
        engine,
        args.data,
        adapters=names,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        include_base=not args.no_base,
        progress=not args.quiet,
    )
    extra = {
        "model": str(args.model),
        "runtime": "edgepeft.runtime",
        "weights": engine.manifest.weights,
        "adapter_files": {t.name: engine.adapters()[t.name].file for t in report.targets
                          if t.name in engine.adapters()},
    }
    print_report(report, args.out, extra)
    return 0


__all__ = ["Conversation", "add_parser", "eval_export", "is_export_folder"]

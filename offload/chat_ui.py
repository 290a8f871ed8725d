"""The interactive loop behind `offload chat`: streamed replies, multi-turn history, thinking shown dimmed
and apart from the answer, speed after each reply, Ctrl-C stops a reply (not the program)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

from offload.errors import OffloadError
from offload.server.parsers import ReasoningParser, prompt_opens_reasoning, template_has_reasoning

HELP = """commands:
  /system TEXT   set the system prompt (/system alone shows it, /system off removes it)
  /reset         forget the conversation (keeps the system prompt)
  /save FILE     save the conversation as JSON      /load FILE   load one
  /think on|off  ask the model to think or not (templates that support it)
  /help          this text                          /exit        quit (also Ctrl-D)
Ctrl-C stops the reply being written."""

THINK_STYLE, ANSWER_STYLE, INFO_STYLE = "dim italic", "", "dim"


class ChatSession:
    """The conversation and its settings; what /save writes and /load reads."""

    def __init__(self, system: str | None = None):
        self.system = system
        self.turns: list[dict] = []
        self.enable_thinking: bool | None = None

    def messages(self) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.turns

    def to_json(self) -> dict:
        return {"messages": self.messages()}

    def load_json(self, data: Any, where: str) -> None:
        msgs = data.get("messages") if isinstance(data, dict) else data
        if not isinstance(msgs, list):
            raise OffloadError(f"{where}: expected a JSON list of messages or {{\"messages\": [...]}}")
        for i, m in enumerate(msgs):
            if not (isinstance(m, dict) and m.get("role") in ("system", "user", "assistant", "tool")
                    and isinstance(m.get("content", ""), str)):
                raise OffloadError(f"{where}: messages[{i}] needs a role (system/user/assistant/tool) and "
                                   f"string content")
        system = [m["content"] for m in msgs if m["role"] == "system"]
        self.system = system[0] if system else None
        self.turns = [m for m in msgs if m["role"] != "system"]


class ChatUI:
    def __init__(self, llm, console=None, input_fn: Callable[[str], str] | None = None, **gen_kwargs):
        from rich.console import Console

        self.llm, self.gen_kwargs = llm, gen_kwargs
        self.console = console or Console(highlight=False)
        self.input_fn = input_fn or (lambda prompt: self.console.input(prompt))
        try:
            self.thinks = template_has_reasoning(llm.tokenizer.chat_template())
        except OffloadError:
            self.thinks = False

    def say(self, text: str, style: str = INFO_STYLE, end: str = "\n") -> None:
        self.console.print(text, style=style or None, end=end, markup=False, highlight=False, soft_wrap=True)

    def command(self, line: str, session: ChatSession) -> bool:
        """Run a /command; False means quit."""
        cmd, _, arg = line.partition(" ")
        arg = arg.strip()
        if cmd in ("/exit", "/quit"):
            return False
        if cmd == "/help":
            self.say(HELP)
        elif cmd == "/reset":
            session.turns = []
            self.say("(conversation cleared)")
        elif cmd == "/system":
            if not arg:
                self.say(f"system prompt: {session.system!r}")
            else:
                session.system = None if arg in ("off", "none", "-") else arg
                self.say("(system prompt removed)" if session.system is None else "(system prompt set)")
        elif cmd == "/think":
            if arg not in ("on", "off"):
                self.say("usage: /think on|off")
            else:
                session.enable_thinking = arg == "on"
                self.say(f"(thinking {arg})")
        elif cmd in ("/save", "/load"):
            if not arg:
                self.say(f"usage: {cmd} FILE")
                return True
            path = Path(arg).expanduser()
            try:
                if cmd == "/save":
                    path.write_text(json.dumps(session.to_json(), ensure_ascii=False, indent=2), encoding="utf-8")
                    self.say(f"(saved {len(session.turns)} messages to {path})")
                else:
                    session.load_json(json.loads(path.read_text(encoding="utf-8")), str(path))
                    self.say(f"(loaded {len(session.turns)} messages from {path})")
            except (OSError, ValueError, OffloadError) as e:
                self.say(f"error: {e}", style="red")
        else:
            self.say(f"unknown command {cmd}; /help lists them", style="red")
        return True

    def reply(self, session: ChatSession) -> None:
        """Generate and print the assistant's turn for the conversation so far; append it to the history."""
        tok = self.llm.tokenizer
        kw = {} if session.enable_thinking is None else {"enable_thinking": session.enable_thinking,
                                                         "thinking": session.enable_thinking}
        text = tok.apply_chat_template(session.messages(), add_generation_prompt=True, **kw)
        ids = tok.encode_chat(session.messages(), add_generation_prompt=True, **kw)
        room = self.llm.context_length - len(ids)
        if room < 1:
            raise OffloadError(f"the conversation is {len(ids)} tokens, the context is {self.llm.context_length}: "
                               f"/reset, or restart with a larger --ctx")
        gen_kwargs = dict(self.gen_kwargs)
        gen_kwargs["max_new_tokens"] = min(gen_kwargs.get("max_new_tokens", 1024), room)
        parser = ReasoningParser(prompt_opens_reasoning(text)) if self.thinks else None
        parts = {"reasoning": [], "content": []}
        last_kind = None
        start, first, n, stopped = time.perf_counter(), None, 0, False

        def show(kind: str, piece: str) -> None:
            nonlocal last_kind
            if kind == "reasoning" and last_kind != "reasoning":
                self.say("thinking: ", style=THINK_STYLE, end="")
            if kind == "content" and last_kind == "reasoning":
                self.say("\n" + "─" * 20, style=INFO_STYLE)
            self.say(piece, style=THINK_STYLE if kind == "reasoning" else ANSWER_STYLE, end="")
            parts[kind].append(piece)
            last_kind = kind

        stream = self.llm.stream_chunks(ids, **gen_kwargs)
        try:
            for chunk in stream:
                if first is None and chunk.token_ids:
                    first = time.perf_counter()
                n = chunk.completion_tokens
                pieces = parser.feed(chunk.text) if parser else [("content", chunk.text)]
                for kind, piece in pieces:
                    if piece:
                        show(kind, piece)
            for kind, piece in parser.finish() if parser else []:
                show(kind, piece)
        except KeyboardInterrupt:
            stopped = True
        finally:
            stream.close()  # stops the generation and frees the sequence
        end = time.perf_counter()
        answer, thought = "".join(parts["content"]), "".join(parts["reasoning"]).strip()
        turn: dict[str, Any] = {"role": "assistant", "content": answer}
        if thought:
            turn["reasoning_content"] = thought
        session.turns.append(turn)
        stats = [f"{n} tokens"]
        if first is not None:
            stats.append(f"TTFT {first - start:.2f} s")
            if n > 1 and end > first:
                stats.append(f"{(n - 1) / (end - first):.1f} tok/s")
        self.say(("\n[stopped] " if stopped else "\n") + "[" + ", ".join(stats) + "]")

    def loop(self, session: ChatSession) -> None:
        self.say("offload chat: /help for commands, Ctrl-C stops a reply, /exit quits")
        interrupted = False
        while True:
            try:
                line = self.input_fn("> ")
            except EOFError:
                self.say("")
                return
            except KeyboardInterrupt:
                if interrupted:
                    self.say("")
                    return
                interrupted = True
                self.say("\n(Ctrl-C again or /exit to quit)")
                continue
            interrupted = False
            line = line.strip()
            if not line:
                continue
            if line.startswith("/"):
                if not self.command(line, session):
                    return
                continue
            session.turns.append({"role": "user", "content": line})
            try:
                self.reply(session)
            except OffloadError as e:
                session.turns.pop()  # the question was not answered: let the user retry
                self.say(f"error: {e}", style="red")
            except KeyboardInterrupt:  # before the first token (while rendering / prefill)
                session.turns.pop()
                self.say("\n[stopped]")
            except Exception as e:  # keep the session alive; say what broke in one line
                session.turns.pop()
                self.say(f"error: {type(e).__name__}: {e}", style="red")


def run_chat(llm, system: str | None = None, max_new_tokens: int = 1024, temperature: float = 0.7,
             console=None, input_fn: Callable[[str], str] | None = None, **gen_kwargs) -> list[dict]:
    """Chat with `llm` in the terminal until /exit or Ctrl-D; returns the conversation's messages.

    gen_kwargs (top_p, top_k, seed, ...) go to llm.stream_chunks; input_fn / console are for tests."""
    session = ChatSession(system)
    if hasattr(llm, "model") and getattr(llm.model, "prefix_cache", None) is None:
        from offload.prefix_cache import enable

        enable(llm, 0)  # each turn resumes after the last one's tokens (one conversation: no snapshots)
    ui = ChatUI(llm, console=console, input_fn=input_fn, max_new_tokens=max_new_tokens,
                temperature=temperature, **gen_kwargs)
    ui.loop(session)
    return session.messages()

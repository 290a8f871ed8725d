"""Concurrent streams: aggregate decode tok/s at 1, 2, 4, 8 sequences decoding together, and the time to first
token of a request that arrives while 3 others stream, on a GGUF; llama.cpp's batched decode beside it.

    offload bench concurrent FILE.gguf [--streams 1,2,4,8] [--tokens 32] [--prompt 64] [--threads N]
                                       [--no-llama-cpp]

Decode: B sequences, each prefilled with its own `--prompt` random tokens (untimed), then `--tokens` steps of
one token per sequence in one forward (offload: Decoder.forward_segments, what the server's Batcher runs;
llama.cpp: one llama_decode of a batch holding one token per sequence id, as its server's --parallel slots
do). Tokens are teacher-forced (random), so both engines do the same work. Aggregate tok/s = B * tokens /
time; the ratio to B = 1 of the same engine, measured in the same run, is the point (each expert's weights
read once a step for every sequence routed to it).

Time to first token: through offload.server.batching.BatchLLM (the server's engine, without HTTP) a request
of `--prompt` tokens alone, then the same request arriving while 3 other streams decode (its prefill
chunk runs in their steps)."""

import argparse
import statistics
import threading
import time

import torch


def offload_decode(model, b: int, n_prompt: int, n_tokens: int, g: torch.Generator) -> float:
    vocab = model.args.vocab_size
    caches = [model.new_cache(n_prompt + n_tokens + 8) for _ in range(b)]
    model.forward_segments([(torch.randint(0, vocab, (n_prompt,), generator=g), c) for c in caches])
    steps = torch.randint(0, vocab, (n_tokens, b), generator=g)
    model.forward_segments([(steps[0, i:i + 1], c) for i, c in enumerate(caches)])  # warm: first step
    t0 = time.perf_counter()
    for s in range(1, n_tokens):
        model.forward_segments([(steps[s, i:i + 1], c) for i, c in enumerate(caches)])
    return b * (n_tokens - 1) / (time.perf_counter() - t0)


class LlamaCppBatch:
    """llama.cpp's batched decode through llama-cpp-python's low-level API (its server's slots do this)."""

    def __init__(self, path: str, n_seq: int, n_ctx_seq: int, threads: int):
        import llama_cpp as lc
        from llama_cpp._utils import suppress_stdout_stderr

        self.lc = lc
        with suppress_stdout_stderr(disable=False):  # llama.cpp's load log
            self._load(lc, path, n_seq, n_ctx_seq, threads)

    def _load(self, lc, path: str, n_seq: int, n_ctx_seq: int, threads: int) -> None:
        lc.llama_backend_init()
        mp = lc.llama_model_default_params()
        mp.n_gpu_layers = 0
        self.model = lc.llama_model_load_from_file(path.encode(), mp)
        cp = lc.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch = n_seq * n_ctx_seq, 512, 512
        cp.n_seq_max, cp.n_threads, cp.n_threads_batch = n_seq, threads, threads
        if hasattr(cp, "kv_unified"):
            cp.kv_unified = True  # one cache shared by the sequences, as llama-server's default
        self.ctx = lc.llama_init_from_model(self.model, cp)
        self.vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self.model))
        self.batch = lc.llama_batch_init(512, 0, n_seq)

    def decode(self, items: list[tuple[int, int, int, bool]]) -> None:
        """items: (token, position, sequence id, wants logits)."""
        bt = self.batch
        bt.n_tokens = len(items)
        for i, (tok, pos, seq, logits) in enumerate(items):
            bt.token[i], bt.pos[i], bt.n_seq_id[i], bt.logits[i] = tok, pos, 1, logits
            bt.seq_id[i][0] = seq
        if self.lc.llama_decode(self.ctx, bt) != 0:
            raise RuntimeError("llama_decode failed")

    def run(self, b: int, n_prompt: int, n_tokens: int, g: torch.Generator) -> float:
        self.lc.llama_memory_clear(self.lc.llama_get_memory(self.ctx), True)
        for s in range(b):
            ids = torch.randint(0, self.vocab, (n_prompt,), generator=g).tolist()
            self.decode([(t, p, s, p == n_prompt - 1) for p, t in enumerate(ids)])
        steps = torch.randint(0, self.vocab, (n_tokens, b), generator=g).tolist()
        self.decode([(steps[0][s], n_prompt, s, True) for s in range(b)])  # warm: first step
        t0 = time.perf_counter()
        for k in range(1, n_tokens):
            self.decode([(steps[k][s], n_prompt + k, s, True) for s in range(b)])
        return b * (n_tokens - 1) / (time.perf_counter() - t0)


def first_token_time(engine, ids: list[int], others: list[list[int]]) -> float:
    """Seconds from submitting `ids` to its first chunk, while `others` stream (started first)."""
    stop = threading.Event()
    started = [threading.Event() for _ in others]

    def stream(p, started):
        gen = engine.stream_chunks(p, max_new_tokens=engine.context_length - len(p), temperature=0.0)
        try:
            for _ in gen:
                started.set()
                if stop.is_set():
                    break
        finally:
            gen.close()

    threads = [threading.Thread(target=stream, args=(p, e)) for p, e in zip(others, started)]
    for t in threads:
        t.start()
    if others:
        for e in started:
            e.wait()
        time.sleep(0.5)  # they are decoding in shared steps
    t0 = time.perf_counter()
    gen = engine.stream_chunks(ids, max_new_tokens=1, temperature=0.0)
    next(gen)
    dt = time.perf_counter() - t0
    gen.close()
    stop.set()
    for t in threads:
        t.join()
    return dt


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="offload bench concurrent", description=__doc__.splitlines()[0])
    ap.add_argument("gguf")
    ap.add_argument("--streams", default="1,2,4,8", help="comma-separated sequence counts")
    ap.add_argument("--tokens", type=int, default=32, help="decode steps per measurement")
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens per sequence")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeat", type=int, default=2, help="rounds, engines in turns; the median is printed")
    ap.add_argument("--no-llama-cpp", action="store_true")
    a = ap.parse_args(argv)
    import psutil

    import offload
    from offload.kernels.cpu.threads import set_threads
    from offload.server.batching import BatchLLM

    streams = [int(s) for s in a.streams.split(",")]
    threads = a.threads or psutil.cpu_count(logical=False) or 1
    set_threads(threads)
    n_ctx = a.prompt + a.tokens + 16
    # the background streams of the first-token measurement run until stopped (caches grow by need)
    llm = offload.load(a.gguf, device="cpu", ctx=max(n_ctx, 4096), progress=False)
    cpp = None
    if not a.no_llama_cpp:
        try:
            cpp = LlamaCppBatch(a.gguf, max(streams), n_ctx, threads)
        except Exception as e:  # llama-cpp-python missing or too old for this API
            print(f"llama.cpp: not run ({type(e).__name__}: {e})")
    print(f"{a.gguf}: {a.prompt}-token prompts, {a.tokens} decode steps, {threads} threads, median of {a.repeat}",
          flush=True)
    g = torch.Generator().manual_seed(0)
    ours = {b: [] for b in streams}
    theirs = {b: [] for b in streams}
    for _ in range(a.repeat):
        for b in streams:
            ours[b].append(offload_decode(llm.model, b, a.prompt, a.tokens, g))
            if cpp is not None:
                theirs[b].append(cpp.run(b, a.prompt, a.tokens, g))
    base = statistics.median(ours[streams[0]])
    base_cpp = statistics.median(theirs[streams[0]]) if cpp else None
    print(f"{'streams':>8} {'offload tok/s':>14} {'x 1 stream':>11} {'llama.cpp tok/s':>16} {'x 1 stream':>11}")
    for b in streams:
        o = statistics.median(ours[b])
        line = f"{b:>8} {o:>14.2f} {o / base:>10.2f}x"
        if cpp is not None:
            c = statistics.median(theirs[b])
            line += f" {c:>16.2f} {c / base_cpp:>10.2f}x"
        print(line, flush=True)
    engine = BatchLLM(llm, 4)
    vocab = llm.model.args.vocab_size
    ids = torch.randint(0, vocab, (a.prompt,), generator=g).tolist()
    others = [torch.randint(0, vocab, (a.prompt,), generator=g).tolist() for _ in range(3)]
    alone, busy = [], []
    for _ in range(a.repeat):
        alone.append(first_token_time(engine, ids, []))
        busy.append(first_token_time(engine, ids, others))
    print(f"time to first token ({a.prompt}-token prompt): alone {statistics.median(alone) * 1e3:.0f} ms, "
          f"while 3 others stream {statistics.median(busy) * 1e3:.0f} ms", flush=True)
    engine.close()

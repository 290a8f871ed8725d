"""`offload bench NAME [ARGS]`: the benchmarks, each against its baseline measured in the same run.

They run through the installed `offload` command (not `python -m` from a checkout, which puts the repository
root on sys.path, where our kernels/ and gguf/ folders shadow the installed packages of the same names)."""

import importlib

import typer

BENCHES = {  # name -> (module with main(argv), what it measures)
    "cpu-moe": ("offload.bench", "CPU expert kernels in GB/s against DRAM read bandwidth (torch.sum)"),
    "decode": ("offload.bench_decode", "decode and prefill tok/s of a GGUF against llama.cpp, in turns"),
    "paging": ("offload.bench_paging", "decode / prefill tok/s of a --page-from-disk load (experts in the file's "
               "layout) against the normal one (interleaved), in turns"),
    "load": ("offload.bench_load", "start to first token of a GGUF against llama.cpp"),
    "dequant": ("offload.gguf.bench_dequant", "torch dequantisation against the numpy reference"),
    "plan-check": ("offload.bench_plan", "the planner's decode / prefill prediction against the engine's measured"),
    "triton-gemv": ("offload.kernels.gpu.bench", "Triton GEMV / MoE decode on ggml blocks, GB/s vs torch.sum"),
    "prefix": ("offload.bench_prefix", "first-token time of a turn sharing a long prefix: cached vs cold"),
    "long-context": ("offload.bench_long", "DSA decode ms/token, prefill tok/s and peak RSS at 1k-128k tokens"),
    "concurrent": ("offload.bench_concurrent", "aggregate decode tok/s at 1-8 streams decoding together and "
                   "first-token time beside 3 streams, with llama.cpp's batched decode"),
    "mla-attention": ("offload.bench_mla", "MLA attention through torch SDPA against explicit scores + softmax: "
                      "time and peak memory of one call, prefill and decode"),
    "hybrid": ("offload.bench_hybrid", "CPU+GPU decode / prefill tok/s of a GGUF against llama.cpp, the time per "
               "layer split, beside the plan's prediction"),
}


def register(app: typer.Typer) -> None:
    names = ", ".join(f"{name}: {what}" for name, (_, what) in BENCHES.items())

    @app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True,
                                   "help_option_names": []},
                 help=f"Run a benchmark: {names}. `offload bench NAME --help` for its options.")
    def bench(ctx: typer.Context,
              name: str = typer.Argument(..., help=" | ".join(BENCHES))) -> None:
        if name in ("-h", "--help"):
            typer.echo(ctx.get_help())
            return
        if name not in BENCHES:
            raise typer.BadParameter(f"'{name}' is not one of {', '.join(BENCHES)}", param_hint="NAME")
        module = importlib.import_module(BENCHES[name][0])
        argv = list(ctx.args)
        if name == "cpu-moe":  # offload.bench dispatches on its first argument
            argv = ["cpu-moe", *argv]
        module.main(argv)

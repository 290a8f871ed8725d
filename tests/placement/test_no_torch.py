"""placement/ is pure Python + numpy: importing and planning must not pull in torch."""

import subprocess

from tests.commands import python_command


def test_placement_does_not_import_torch():
    code = ("import sys\n"
            "from offload.placement import catalog, cost, gguf_meta, hardware, html, inventory, model, planner, "
            "profile, quant, recipe, report\n"
            "from offload.placement.hardware import GPU, Hardware\n"
            "hw = Hardware(gpus=[GPU('g', 24 << 30)], ram_bytes=512 << 30, dram_bw=3e11, pcie_bw=2.5e10, cpu_cores=8)\n"
            "p = planner.plan(model.from_catalog('glm-4.5-air'), hw)\n"
            "html.to_html(report.to_json(p))\n"
            "import offload.commands.plan\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    r = subprocess.run([*python_command(), "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr

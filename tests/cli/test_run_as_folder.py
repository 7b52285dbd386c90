"""`python /path/to/pack/hunyuan_loader ...`: the pack's root on the path, never the folder itself (whose
sub-packages would hide PyPI packages of the same name: transformers 5.x imports ``kernels``)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

MAIN = Path(__file__).resolve().parents[2] / "hunyuan_loader" / "__main__.py"


def test_the_folder_is_replaced_by_the_pack_root(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("hy3_main_under_test", MAIN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    folder = MAIN.parent
    path = [str(folder), "/usr/lib/python3/dist-packages", str(tmp_path)]
    fixed = module.pack_root_on_path(path, folder)
    assert fixed[0] == str(folder.resolve().parent)
    assert all(Path(p).resolve() != folder.resolve() for p in fixed)
    assert fixed[1:] == path[1:]

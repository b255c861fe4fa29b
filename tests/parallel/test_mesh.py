"""The dp x sp layout on four real gloo ranks: ranks of an sp group adjacent, dp groups
across them, the world as the gradient group."""

from __future__ import annotations

import json
import os

import pytest
import torch

from hylas.model.config import ConfigError
from hylas.parallel.mesh import Layout, init_groups, layout_from_env, shutdown
from tests.helpers import spawn_ranks

WORLD, SP = 4, 2
TIMEOUT_S = 120


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD),
        GLOO_SOCKET_IFNAME="lo",
    )
    torch.set_num_threads(1)
    layout = layout_from_env(sp=SP)
    groups = init_groups(layout, torch.device("cpu"), timeout_s=60)
    summed = torch.tensor([float(rank)])
    torch.distributed.all_reduce(summed, group=groups.dp)  # a real collective on each group
    result = {
        "dp_rank": layout.dp_rank,
        "sp_rank": layout.sp_rank,
        "dp": groups.ranks("dp"),
        "sp": groups.ranks("sp"),
        "grad": groups.ranks("grad"),
        "dp_sum": summed.item(),
    }
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    shutdown()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out_dir = tmp_path_factory.mktemp("mesh")
    spawn_ranks(_worker, WORLD, out_dir, TIMEOUT_S)
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(WORLD)]


@pytest.mark.integration
def test_a_2x2_mesh_has_adjacent_sp_groups_and_strided_dp_groups(ranks):
    expected = {  # rank = dp_rank * sp + sp_rank
        0: (0, 0, [0, 2], [0, 1]),
        1: (0, 1, [1, 3], [0, 1]),
        2: (1, 0, [0, 2], [2, 3]),
        3: (1, 1, [1, 3], [2, 3]),
    }
    for rank, r in enumerate(ranks):
        assert (r["dp_rank"], r["sp_rank"], r["dp"], r["sp"]) == expected[rank]
        assert r["grad"] == [0, 1, 2, 3]  # parameters are replicated over sp
        assert r["dp_sum"] == sum(r["dp"])  # the dp group really reduces over those ranks


def test_layout_arithmetic_and_a_world_that_does_not_divide(monkeypatch):
    layout = Layout(world=8, rank=5, local_rank=1, sp=4)
    assert (layout.dp, layout.dp_rank, layout.sp_rank) == (2, 1, 1)
    monkeypatch.setenv("WORLD_SIZE", "6")
    with pytest.raises(ConfigError, match="world of 6 processes does not divide into"):
        layout_from_env(sp=4)

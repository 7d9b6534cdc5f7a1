"""The distillation loop: resume after a kill, NaN stop, evaluation hook, config errors, and a short
run that lowers the matching loss (on a small learnable synthetic dataset with toy experts; the
embedded default needs the data, experts and evaluator stages)."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

from distill_toys import expert_trajectory, paired_data, tiny_student
from lors.checkpoints import CheckpointStore
from lors.distill.engine import TrajectoryRun, build_optimizer, distill_loop
from lors.distill.lors import LorsSettings, n_pairs
from lors.distill.matching import MatchResult, tesla_iteration, walk_batches
from lors.distill.mtt_vl import MttSettings, mtt_match
from lors.distill.registry import get_method
from lors.distill.synthetic import LearnableSet, noise_init, real_init
from lors.distill.tesla_vl import tesla_match
from lors.distill.trajectories import ExpertPool, Segment
from lors.errors import ConfigError, DataError, LorsError
from lors.similarity import IdentitySimilarity, build_similarity

SETTING = dict(lr_img=50.0, lr_txt=50.0, lr_lr=1e-3, syn_steps=2, max_start_epoch=2, expert_epochs=1, iterations=5)
LORS_ONLY = dict(lr_sim=5.0, rank=2, alpha=1.0, mini_batch=4)


@pytest.fixture(scope="module")
def world():
    """Real pairs, a float32 student with dropout on (so RNG restoration matters), two experts."""
    student = tiny_student("conv", dropout=0.1, dtype=torch.float32)
    images, texts, labels = paired_data(64, seed=0, dtype=torch.float32)
    experts = [expert_trajectory(student, images, texts, epochs=3, lr=0.5, seed=s) for s in range(2)]
    return student, images, texts, labels, experts


def make_run(world, method: str, n: int = 8, seed: int = 0, **overrides):
    """A TrajectoryRun and its match function, as the lors / tesla_vl / mtt_vl modules build them."""
    student, images, texts, _, experts = world
    if method == "mtt_vl":
        settings = MttSettings(**{**SETTING, "mini_batch": 4, **overrides})
    else:
        settings = LorsSettings(**{**SETTING, **LORS_ONLY, **overrides})
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    similarity = build_similarity("lowrank", n, settings.rank, settings.alpha) if method == "lors" \
        else IdentitySimilarity(n)
    syn = LearnableSet(images[:n], texts[:n], similarity, settings.init_lr)
    numels = (student.image_layout.numel, student.text_layout.numel)
    pool = ExpertPool(experts, settings.max_start_epoch + settings.expert_epochs, numels, torch.device("cpu"))
    run = TrajectoryRun(syn, pool, settings, build_optimizer(syn, settings, getattr(settings, "lr_sim", None)),
                        generator)
    if method == "mtt_vl":
        match = mtt_match(settings, "clean", student, syn, generator)
    else:
        match = tesla_match(settings, student, syn, generator)
    return run, match


def loop(run, match, store, iterations=4, protocol="reference", checkpoint_every=2, **kwargs):
    run.settings = run.settings.model_copy(update={"iterations": iterations})
    return distill_loop(run, match, protocol=protocol, checkpoints=store, checkpoint_every=checkpoint_every, **kwargs)


def final_state(run: TrajectoryRun) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in run.syn.state_dict().items()}


class Killed(Exception):
    pass


@pytest.mark.parametrize("method", ["lors", "mtt_vl"])
def test_resume_after_kill_equals_uninterrupted_run(world, tmp_path, method, caplog):
    straight, match = make_run(world, method)
    full, _ = loop(straight, match, CheckpointStore(tmp_path / "a", "fp"))
    assert len(full) == 5  # reference protocol: iterations + 1 updates

    killed, real_match = make_run(world, method)
    calls = []

    def dies_at_3(segment):
        calls.append(1)
        if len(calls) == 4:
            raise Killed
        return real_match(segment)

    store = CheckpointStore(tmp_path / "b", "fp")
    with pytest.raises(Killed):
        loop(killed, dies_at_3, store)
    assert store.load("latest")["iteration"] == 2
    resumed, match = make_run(world, method)
    with caplog.at_level(logging.INFO, logger="lors.distill.engine"):
        rest, _ = loop(resumed, match, store)
    assert "resuming from the checkpoint at iteration 2" in caplog.text
    assert [r["iteration"] for r in rest] == [0, 1, 2, 3, 4]
    assert [r["matching_loss"] for r in rest] == [r["matching_loss"] for r in full]
    for key, value in final_state(straight).items():
        torch.testing.assert_close(final_state(resumed)[key], value, rtol=0, atol=0)


def test_clean_protocol_runs_iterations_updates(world, tmp_path):
    run, match = make_run(world, "tesla_vl")
    history, seconds = loop(run, match, CheckpointStore(tmp_path, "fp"), iterations=3, protocol="clean")
    assert [r["iteration"] for r in history] == [0, 1, 2] and seconds > 0


def test_nan_loss_stops_with_one_line_and_keeps_last_good_checkpoint(world, tmp_path):
    run, real_match = make_run(world, "lors")
    calls = []

    def match(segment):
        calls.append(1)
        result = real_match(segment)
        return MatchResult(float("nan"), result.loss_img, float("nan")) if len(calls) == 4 else result

    store = CheckpointStore(tmp_path, "fp")
    with pytest.raises(LorsError, match=r"toy: matching loss is nan at iteration 3; .*stays in") as err:
        loop(run, match, store, iterations=10, label="toy")
    assert "\n" not in str(err.value)
    assert store.load("latest")["iteration"] == 2


def test_unreadable_checkpoint_is_set_aside_and_the_loop_starts_afresh(world, tmp_path, caplog):
    """A truncated checkpoint (killed mid-write before atomic writes, a full disk) must not fail every rerun."""
    run, match = make_run(world, "tesla_vl")
    store = CheckpointStore(tmp_path, "fp")
    loop(run, match, store, iterations=1, checkpoint_every=1)
    path = tmp_path / "latest.pt"
    path.write_bytes(path.read_bytes()[:100])
    run, match = make_run(world, "tesla_vl")
    with caplog.at_level(logging.WARNING, logger="lors.checkpoints"):
        history, _ = loop(run, match, store, iterations=1, checkpoint_every=1)
    assert [r["iteration"] for r in history] == [0, 1]
    assert "unreadable checkpoint" in caplog.text
    assert len(list(tmp_path.glob("latest.pt.unreadable-*"))) == 1


def test_degenerate_expert_segment_gives_a_non_finite_loss(world):
    student, images, texts, _, experts = world
    syn = LearnableSet(images[:4], texts[:4], build_similarity("lowrank", 4, 2, 1.0), 0.1)
    traj = experts[0]
    segment = Segment(traj.image[0], traj.text[0], traj.image[0], traj.text[0])  # D = 0
    result = tesla_iteration(student, syn, segment, walk_batches(4, 4, 1, torch.Generator()), loss="wbce",
                             temperature=0.07, merge_branches=False)
    assert not torch.isfinite(torch.tensor(result.loss))


def test_checkpoint_of_another_configuration_is_ignored(world, tmp_path):
    run, match = make_run(world, "tesla_vl")
    loop(run, match, CheckpointStore(tmp_path, "old"), iterations=1, checkpoint_every=1)
    run, match = make_run(world, "tesla_vl")
    history, _ = loop(run, match, CheckpointStore(tmp_path, "new"), iterations=1, checkpoint_every=1)
    assert [r["iteration"] for r in history] == [0, 1]


def test_expert_pool_round_robin_reshuffles_and_validates(world):
    student, *_, experts = world
    numels = (student.image_layout.numel, student.text_layout.numel)
    pool = ExpertPool(experts * 2, 3, numels, torch.device("cpu"), cache_size=2)
    g = torch.Generator().manual_seed(0)
    first_pass = [pool.next_expert(g) for _ in range(4)]
    second_pass = [pool.next_expert(g) for _ in range(4)]
    assert sorted(first_pass) == sorted(second_pass) == [0, 1, 2, 3]
    for index in range(4):
        pool.trajectory(index)
    assert list(pool._cache) == [2, 3]
    with pytest.raises(DataError, match="expert 0: 4 image snapshots, distillation needs 5"):
        ExpertPool(experts, 5, numels, torch.device("cpu")).trajectory(0)
    with pytest.raises(DataError, match="expert 0: image snapshots have shape"):
        ExpertPool(experts, 3, (7, numels[1]), torch.device("cpu")).trajectory(0)


def test_initialisation_budget_and_noise():
    assert n_pairs(100, "reference") == 99
    assert n_pairs(100, "clean") == 100
    images_uint8 = torch.randint(0, 256, (5, 3, 4, 4), dtype=torch.uint8).numpy()
    txt2img = torch.tensor([0, 0, 1, 2, 3, 4, 4]).numpy()
    features = torch.randn(7, 3)
    images, texts, rows = real_init(images_uint8, txt2img, features, 4, torch.Generator().manual_seed(0), None)
    assert len(set(rows.tolist())) == 4
    torch.testing.assert_close(texts, features[rows])
    from lors.data.transforms import normalize

    torch.testing.assert_close(images, normalize(torch.as_tensor(images_uint8[txt2img[rows.numpy()]])))
    with pytest.raises(ConfigError, match="needs 8 pairs but the training split has only 7 caption rows"):
        real_init(images_uint8, txt2img, features, 8, torch.Generator(), None)
    with pytest.raises(ConfigError, match="at least one synthetic pair"):  # LoRS at budget 1 pays it all for S~
        real_init(images_uint8, txt2img, features, n_pairs(1, "reference"), torch.Generator(), None)
    noise_images, noise_texts = noise_init(2000, 4, 3, torch.Generator().manual_seed(0))
    assert noise_images[:, 0].mean().item() == pytest.approx(-0.0626, abs=0.02)
    assert noise_images[:, 2].std().item() == pytest.approx(1.0539, abs=0.02)
    assert noise_texts.std().item() == pytest.approx(0.5253, abs=0.02)


def test_unknown_method_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown distillation method 'dm' \\(known: .*lors"):
        get_method("dm")


# ---- a short distillation learns ------------------------------------------------------------------

def fixed_matching_loss(run: TrajectoryRun, student) -> float:
    """Mean matching loss over every (expert, start) segment with fixed batches and no dropout noise."""
    syn = copy.deepcopy(run.syn)
    torch.manual_seed(0)  # same dropout masks for the before and after measurements
    losses = []
    for index in range(len(run.experts)):
        image, text = run.experts.trajectory(index)
        for start in range(run.settings.max_start_epoch):
            segment = Segment(image[start], text[start], image[start + 1], text[start + 1])
            batches = walk_batches(len(syn), 4, 2, torch.Generator().manual_seed(start))
            losses.append(tesla_iteration(student, syn, segment, batches, loss="wbce",
                                          temperature=0.07, merge_branches=False).loss)
    return sum(losses) / len(losses)


def test_short_lors_distillation_lowers_the_matching_loss(world, tmp_path):
    run, match = make_run(world, "lors", n=8, seed=1)
    before = fixed_matching_loss(run, world[0])
    loop(run, match, CheckpointStore(tmp_path, "fp"), iterations=15, checkpoint_every=100)
    after = fixed_matching_loss(run, world[0])
    assert after < 0.9 * before, (before, after)

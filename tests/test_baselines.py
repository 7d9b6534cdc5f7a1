"""Coreset baselines: each selector against an independent computation, and the select stage's output."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from baselines import SELECTORS, get_selector
from baselines.clip_score import select_clip_score
from baselines.features import ForgettingRecord, PairEmbeddings, PairPool, PairScores
from baselines.forgetting import forgetting_order
from baselines.herding import herding
from baselines.kcenter import kcenter_greedy
from baselines.ranking import rank_descending
from baselines.vas import second_moment, select_vas, vas_scores
from lors.config import SelectConfig
from lors.data.transforms import normalize
from lors.errors import ConfigError
from lors.stages.select import run_selection
from lors.synset import SyntheticSet


def clustered(n: int, dim: int, seed: int, clusters: int = 6, noise: float = 0.3) -> torch.Tensor:
    """Unit rows around a few centres: structured like real embeddings, with near-ties."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(clusters, dim, generator=g)
    labels = torch.randint(clusters, (n,), generator=g)
    return F.normalize(centres[labels] + noise * torch.randn(n, dim, generator=g), dim=1)


def naive_herding(x: torch.Tensor, budget: int) -> list[int]:
    """Literal definition: each pick minimises the distance of the running mean to the pool mean."""
    mu, total, picked = x.double().mean(0), torch.zeros(x.shape[1], dtype=torch.float64), []
    for t in range(budget):
        gaps = ((mu - (total + x.double()) / (t + 1)) ** 2).sum(1)
        gaps[picked] = float("inf")
        picked.append(int(gaps.argmin()))
        total += x[picked[-1]].double()
    return picked


def naive_kcenter(x: torch.Tensor, budget: int, first: int) -> tuple[list[int], list[float]]:
    """Literal definition on the full distance matrix."""
    dist = torch.cdist(x.double(), x.double())
    centres, radii = [first], []
    for _ in range(budget):
        nearest = dist[:, centres].min(1).values
        radii.append(float(nearest.max()))
        nearest[centres] = -1
        centres.append(int(nearest.argmax()))
    return centres[:budget], radii


def pool_of(n_images: int = 40, captions: int = 5, dim: int = 24, experts: int = 2, seed: int = 0) -> PairPool:
    g = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(n_images, dim, generator=g), dim=1)
    txt2img = torch.arange(n_images).repeat_interleave(captions)
    text = F.normalize(image[txt2img] + 0.8 * torch.randn(len(txt2img), dim, generator=g), dim=1)
    events = torch.randint(0, 4, (experts, len(txt2img)), generator=g)
    learned = torch.rand(experts, len(txt2img), generator=g) > 0.1
    return PairPool(len(txt2img), lambda: PairEmbeddings(image, text, txt2img, "test"),
                    lambda: ForgettingRecord(events, learned, "test"))


# -- herding -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1])
def test_herding_first_pick_is_nearest_the_mean(seed):
    x = clustered(300, 32, seed)
    nearest = int(((x - x.mean(0)) ** 2).sum(1).argmin())
    assert int(herding(x, 1, progress=False)[0]) == nearest


# tight clusters (noise 0.01) put near-ties below float16 resolution: only a correct screen passes
@pytest.mark.parametrize("seed,dim,noise", [(0, 16, 0.3), (1, 64, 0.3), (2, 300, 0.3), (3, 200, 0.01)])
def test_herding_matches_the_literal_definition(seed, dim, noise):
    x = clustered(400, dim, seed, clusters=3 if noise < 0.1 else 6, noise=noise)
    assert herding(x, 40, progress=False).tolist() == naive_herding(x, 40)


def test_herding_refuses_rows_off_the_sphere():
    with pytest.raises(ValueError, match="L2-normalised"):
        herding(torch.randn(10, 4) * 3, 2, progress=False)


# -- k-center ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed,dim,noise", [(0, 8, 0.3), (1, 48, 0.3), (2, 300, 0.3), (3, 200, 0.03)])
def test_kcenter_matches_the_literal_definition_and_radius_never_increases(seed, dim, noise):
    x = clustered(350, dim, seed, clusters=3 if noise < 0.1 else 6, noise=noise)
    first = int(torch.randint(len(x), (1,), generator=torch.Generator().manual_seed(seed)))
    indices, radii = kcenter_greedy(x, 60, torch.Generator().manual_seed(seed), progress=False)
    want, want_radii = naive_kcenter(x, 60, first)
    assert indices.tolist() == want
    torch.testing.assert_close(radii.double(), torch.tensor(want_radii, dtype=torch.float64), atol=1e-5, rtol=0)
    assert (radii[1:] <= radii[:-1] + 1e-7).all() and radii[-1] < radii[0]


def test_kcenter_with_duplicate_rows_still_returns_distinct_centres():
    x = F.normalize(torch.randn(5, 6, generator=torch.Generator().manual_seed(0)), dim=1).repeat(4, 1)
    indices, radii = kcenter_greedy(x, 12, torch.Generator().manual_seed(0), progress=False)
    assert len(set(indices.tolist())) == 12 and float(radii[-1]) == pytest.approx(0.0, abs=1e-3)


def test_screening_off_gives_the_same_picks(monkeypatch):
    """The float32-only fallback (used when a float16 kernel breaks the bound) selects the same pairs."""
    x = clustered(300, 40, 3)
    screened = herding(x, 25, progress=False), kcenter_greedy(x, 25, torch.Generator().manual_seed(0), False)[0]
    monkeypatch.setattr("baselines.screening.ScreenedProducts._bound_holds", lambda self: False)
    plain = herding(x, 25, progress=False), kcenter_greedy(x, 25, torch.Generator().manual_seed(0), False)[0]
    assert screened[0].tolist() == plain[0].tolist() and screened[1].tolist() == plain[1].tolist()


# -- VAS ---------------------------------------------------------------------------------------------

def test_vas_scores_equal_a_hand_computation():
    f = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    # Sigma = mean f f^T = [[1.36, 0.48], [0.48, 1.64]] / 3; f3.Sigma.f3 = mean_j (f3.f_j)^2 = (0.36+0.64+1)/3
    sigma = second_moment(f)
    torch.testing.assert_close(sigma, torch.tensor([[1.36, 0.48], [0.48, 1.64]]) / 3)
    torch.testing.assert_close(vas_scores(f, sigma), torch.tensor([1.36 / 3, 1.64 / 3, 2 / 3]))
    # weights = repeating a row: f1 counted twice -> Sigma = [[2.36, 0.48], [0.48, 1.64]] / 4
    torch.testing.assert_close(second_moment(f, torch.tensor([2, 1, 1])), second_moment(f[[0, 0, 1, 2]]))


def test_vas_keeps_clip_filtered_pairs_with_the_highest_vas():
    pool = pool_of()
    emb = pool.embeddings
    selection = select_vas(pool, 10, torch.Generator().manual_seed(0), SelectConfig(vas_clip_fraction=0.3))
    kept = set(torch.argsort(emb.pair_cosines, descending=True)[:60].tolist())  # ceil(0.3 * 200)
    assert set(selection.indices.tolist()) <= kept
    per_pair = torch.stack([emb.image[i] @ second_moment(emb.image[emb.txt2img]) @ emb.image[i]
                            for i in emb.txt2img.tolist()])
    chosen = per_pair[selection.indices]
    rest = per_pair[sorted(kept - set(selection.indices.tolist()))]
    assert float(chosen.min()) >= float(rest.max()) - 1e-6


def test_vas_clip_fraction_below_the_budget_is_a_config_error():
    with pytest.raises(ConfigError, match="vas_clip_fraction"):
        select_vas(pool_of(), 50, torch.Generator().manual_seed(0), SelectConfig(vas_clip_fraction=0.2))


# -- forgetting ---------------------------------------------------------------------------------------

def test_forgetting_ranks_never_learned_then_most_forgotten_first():
    events = torch.tensor([[0, 3, 1, 5, 0, 2], [1, 0, 1, 0, 0, 2]])
    learned = torch.tensor([[True, True, True, True, False, True], [True, True, True, True, True, False]])
    order = forgetting_order(events, learned, torch.Generator().manual_seed(0)).tolist()
    # never learned by one expert: rows 4 (0 events) and 5 (4 events) -> 5 before 4; then 3 (5), 1 (3), 2 (2), 0 (1)
    assert order == [5, 4, 3, 1, 2, 0]


def test_forgetting_ties_are_broken_by_the_seed():
    events, learned = torch.zeros(1, 50, dtype=torch.long), torch.ones(1, 50, dtype=torch.bool)
    events[0, 7] = 2
    orders = [forgetting_order(events, learned, torch.Generator().manual_seed(s)).tolist() for s in (0, 0, 1)]
    assert orders[0] == orders[1] != orders[2]
    assert orders[0][0] == orders[2][0] == 7


def test_rank_descending_is_a_stable_sort_of_a_seeded_permutation():
    scores = torch.tensor([1.0, 3.0, 2.0, 3.0])
    ranked = rank_descending(scores, torch.Generator().manual_seed(0))
    assert scores[ranked].tolist() == [3.0, 3.0, 2.0, 1.0] and sorted(ranked.tolist()) == [0, 1, 2, 3]


# -- every method ------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", list(SELECTORS))
def test_every_method_returns_budget_distinct_pairs_deterministically(method):
    selector = get_selector(method)
    runs = [selector.select(pool_of(), 25, torch.Generator().manual_seed(seed), SelectConfig()).indices
            for seed in (0, 0, 1)]
    assert len(runs[0]) == 25 and len(set(runs[0].tolist())) == 25
    assert 0 <= int(runs[0].min()) and int(runs[0].max()) < 200
    assert runs[0].tolist() == runs[1].tolist()
    if method in ("random", "kcenter"):
        assert runs[0].tolist() != runs[2].tolist()


def test_unknown_method_is_one_config_error_line():
    with pytest.raises(ConfigError, match="unknown selection method 'greedy'") as info:
        get_selector("greedy")
    assert "\n" not in str(info.value)


# -- the select stage --------------------------------------------------------------------------------

class FakeSplit:
    def __init__(self, n_images: int = 12, captions: int = 3, size: int = 16) -> None:
        rng = np.random.default_rng(0)
        self.images = rng.integers(0, 256, (n_images, 3, size, size), dtype=np.uint8)
        self.txt2img = np.repeat(np.arange(n_images), captions)
        self.captions = [f"caption {i}" for i in range(len(self.txt2img))]


@pytest.fixture
def staged(monkeypatch, tiny_params):
    """The select stage over an in-memory split; the experts' embeddings come from `pool_of`."""
    import lors.data

    split = FakeSplit()
    texts = torch.randn(len(split.txt2img), 10, generator=torch.Generator().manual_seed(1))
    monkeypatch.setattr(lors.data, "load_split", lambda p, d, s: split, raising=False)
    monkeypatch.setattr(lors.data, "load_text_features", lambda p, d, s: texts, raising=False)
    monkeypatch.setattr("lors.stages.select.load_expert_embeddings",
                        lambda *a: pool_of(n_images=12, captions=3).embeddings)
    return tiny_params, split, texts


@pytest.mark.parametrize("method", ["random", "herding", "vas"])
def test_selection_is_written_as_a_synthetic_set(staged, method):
    params, split, texts = staged
    path = run_selection(params, "embedded", 8, method)
    synset = SyntheticSet.load(path)
    rows = synset.meta["indices"]
    assert len(synset) == 8 == len(set(rows)) and synset.meta["n_pairs"] == 8
    torch.testing.assert_close(synset.similarity, torch.eye(8))
    torch.testing.assert_close(synset.texts, texts[rows])
    torch.testing.assert_close(synset.images, normalize(torch.as_tensor(split.images[split.txt2img[rows]])))
    assert synset.lr_img == pytest.approx(0.1) == params.experts.lr_img
    assert synset.lr_txt == pytest.approx(0.1) == params.experts.lr_txt
    for key, value in {"method": method, "budget": 8, "dataset": "embedded", "seed": 0, "image_size": 16,
                       "image_encoder": "test_nfnet", "text_encoder": "minilm"}.items():
        assert synset.meta[key] == value
    metrics = json.loads((path.parent / "metrics.json").read_text())
    assert metrics["pool_size"] == 36 and metrics["selection_seconds"] >= 0
    sources = {"random": "none (uniform sampling)", "herding": "test", "vas": "test; expert cosine (test)"}
    assert metrics["feature_source"] == sources[method]
    assert metrics["pair_scorer"] == synset.meta["pair_scorer"] == ("expert_cosine" if method == "vas" else None)
    assert run_selection(params, "embedded", 8, method) == path
    assert SyntheticSet.load(path).meta["indices"] == rows  # same seed, same pairs


@pytest.mark.parametrize("budget", [0, 37])
def test_budget_outside_the_pool_is_one_config_error_line(staged, budget):
    with pytest.raises(ConfigError, match=f"budget {budget} is outside 1..36") as info:
        run_selection(staged[0], "embedded", budget, "random")
    assert "\n" not in str(info.value)


def test_unknown_method_fails_before_reading_data(tiny_params):
    with pytest.raises(ConfigError, match="unknown selection method"):
        run_selection(tiny_params, "embedded", 5, "coreset")


@pytest.mark.slow
def test_every_method_on_the_embedded_default_end_to_end(tmp_path):
    """prepare -> embed-text -> experts -> select (all methods) -> evaluate, on a very small embedded set."""
    from conftest import tiny_params_dict

    from lors.config import Params
    from lors.data.prepare import prepare_dataset
    from lors.data.text_features import embed_dataset
    from lors.evaluation.protocol import evaluate_synset
    from lors.stages.experts import run_expert

    raw = tiny_params_dict(tmp_path / "work")
    raw["datasets"]["embedded"]["embedded"].update(n_train=20, n_val=10, n_test=10, captions_per_image=2)
    raw["experts"]["epochs"] = 1
    raw["evaluate"].update(num_eval=1, default={"epochs": 2, "eval_every": 1})
    params = Params.model_validate(raw)
    prepare_dataset(params, "embedded")
    embed_dataset(params, "embedded")
    for expert in params.grid.experts:
        run_expert(params, "embedded", expert)
    sets = {method: SyntheticSet.load(run_selection(params, "embedded", 10, method)) for method in SELECTORS}
    for method, synset in sets.items():
        assert len(synset) == 10 and len(set(synset.meta["indices"])) == 10, method
        assert synset.meta["image_size"] == 16 and synset.images.shape == (10, 3, 16, 16)
    assert "2 experts" in sets["forgetting"].meta["feature_source"]
    assert "expert_0.safetensors" in sets["herding"].meta["feature_source"]
    result = evaluate_synset(params, sets["herding"], "embedded", progress=False)
    assert 0 <= result["summary"]["best"]["r_mean"]["mean"] <= 100


# -- real CLIP pair scores -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    """A tiny random CLIP with its image processor and tokenizer saved as a local model folder."""
    from transformers import CLIPImageProcessor

    from lors.edge.models import tiny_clip, tiny_tokenizer

    folder = tmp_path_factory.mktemp("clip") / "tiny-clip"
    tokenizer = tiny_tokenizer()
    tiny_clip(len(tokenizer), image_size=16).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_clip_pair_scores_equal_one_pair_at_a_time(clip_folder):
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    from baselines.features import load_clip_scores

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (4, 3, 16, 16), generator=g, dtype=torch.uint8).numpy()
    captions = ["a red circle", "two blue squares on grass", "a star", "a cat", "three dots", "a cross"]
    txt2img = np.array([0, 0, 1, 2, 3, 3])
    scores = load_clip_scores(str(clip_folder), images, captions, txt2img, torch.device("cpu"))
    assert scores.scorer == "clip" and scores.scores.shape == (6,)
    model = CLIPModel.from_pretrained(clip_folder).eval()
    processor, tokenizer = AutoImageProcessor.from_pretrained(clip_folder), AutoTokenizer.from_pretrained(clip_folder)
    with torch.no_grad():
        for j, caption in enumerate(captions):
            pixels = processor(images=torch.from_numpy(images[txt2img[j]]), return_tensors="pt")["pixel_values"]
            image = model.get_image_features(pixel_values=pixels).pooler_output[0]
            text = model.get_text_features(**tokenizer([caption], return_tensors="pt")).pooler_output[0]
            assert float(scores.scores[j]) == pytest.approx(float(F.cosine_similarity(image, text, dim=0)), abs=1e-5)


def test_clip_score_uses_the_configured_clip_else_names_the_expert_fallback():
    fallback = pool_of()
    selection = select_clip_score(fallback, 10, torch.Generator().manual_seed(0), SelectConfig())
    assert fallback.pair_scorer == "expert_cosine"
    assert set(selection.indices.tolist()) == set(torch.argsort(fallback.embeddings.pair_cosines,
                                                                descending=True)[:10].tolist())
    scores = torch.linspace(0, 1, fallback.n_pairs)
    clip = PairPool(fallback.n_pairs, fallback._load_embeddings, fallback._load_forgetting,
                    load_clip_scores=lambda: PairScores(scores, "clip", "CLIP test"))
    assert select_clip_score(clip, 5, torch.Generator().manual_seed(0), SelectConfig()).indices.tolist() == \
        list(range(fallback.n_pairs - 1, fallback.n_pairs - 6, -1))
    assert clip.pair_scorer == "clip" and "embeddings" not in clip.__dict__
    kept = select_vas(clip, 5, torch.Generator().manual_seed(0), SelectConfig(vas_clip_fraction=0.5))
    assert all(int(i) >= fallback.n_pairs // 2 for i in kept.indices)


def test_select_stage_records_the_clip_scorer(tiny_params, clip_folder):
    from lors.data.prepare import prepare_dataset
    from lors.data.text_features import embed_dataset

    tiny_params.select.clip_model = str(clip_folder)
    prepare_dataset(tiny_params, "embedded")
    embed_dataset(tiny_params, "embedded")
    synset = SyntheticSet.load(run_selection(tiny_params, "embedded", 5, "clip_score"))
    assert synset.meta["pair_scorer"] == "clip" and "CLIP" in synset.meta["feature_source"]
    tiny_params.select.clip_model = str(clip_folder.parent / "missing")
    with pytest.raises(ConfigError, match="^select.clip_model: "):
        run_selection(tiny_params, "embedded", 5, "clip_score")

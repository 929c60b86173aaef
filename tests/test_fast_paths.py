"""Speed paths change no score: chunked ranking and top-K, chunked and subset item tables,
length-bucketed padding, the sampled softmax's arithmetic, position-wise training and the chunked
training loss, each against the plain path."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

from tests.conftest import assert_close_f32
from unisrec_x.data.positions import PositionExamples
from unisrec_x.data.sequences import LengthBucketBatchSampler, SequenceExamples
from unisrec_x.training.module import SeqRecModule
from unisrec_x.training.pretrain import PretrainModule
from unisrec_x.objectives.losses import chunked_next_item_loss, info_nce, next_item_loss
from unisrec_x.evaluation.metrics import RankingMetrics, target_ranks
from unisrec_x.model.unisrec import UniSRec
from unisrec_x.evaluation.ranking import chunked_target_ranks, chunked_topk
from unisrec_x.objectives.sampled_softmax import NegativeSampler, sampled_softmax_loss


@contextlib.contextmanager
def saved_sizes():
    """Sizes (numel) of the tensors autograd saves for backward inside the block."""
    sizes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda tensor: sizes.append(tensor.numel()) or tensor, lambda t: t):
        yield sizes


def assert_same_gradients(got, expected):
    """Gradients of two code paths; ``None`` (a parameter only training mode uses, e.g. gate noise) on both or neither."""
    for g, e in zip(got, expected, strict=True):
        assert (g is None) == (e is None)
        if g is not None:
            assert_close_f32(g, e, rtol=1e-4)


def small_net(use_text=True, use_item_id=True, items=50, similarity="cosine") -> UniSRec:
    torch.manual_seed(0)
    net = UniSRec(num_items=items, plm_dim=16, hidden_dim=12, n_heads=2, inner_dim=16, max_seq_len=20, n_experts=3,
                  use_text=use_text, use_item_id=use_item_id, similarity=similarity).eval()
    if use_text:
        features = torch.randn(items + 1, 16)
        features[0] = 0
        net.set_item_features(features)
    return net


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_chunked_ranks_equal_full_matrix_ranks_with_ties(chunk):
    torch.manual_seed(1)
    query, candidates = torch.randn(33, 8), torch.randn(64, 8)
    candidates[10] = candidates[3]  # exact duplicates tie with each other
    candidates[40] = candidates[3]
    target = torch.randint(0, 64, (33,))
    target[:4] = 3
    expected = target_ranks(query @ candidates.T, target)
    assert torch.equal(chunked_target_ranks(query, candidates, target, chunk), expected)


@pytest.mark.parametrize("chunk", [1, 5, 64, 1000])
def test_chunked_topk_equals_topk_with_and_without_exclusions(chunk):
    torch.manual_seed(2)
    query, candidates = torch.randn(9, 8), torch.randn(64, 8)
    scores = query @ candidates.T
    top = scores.topk(10, dim=1)
    got_scores, got_index = chunked_topk(query, candidates, 10, chunk)
    assert_close_f32(got_scores, top.values)
    assert torch.equal(got_index, top.indices)
    exclude = torch.stack([torch.zeros(9, dtype=torch.long), top.indices[:, 0], torch.full((9,), -1)], dim=1)
    exclude[0, 0] = -1  # -1 excludes nothing
    masked = scores.clone()
    for row, banned in enumerate(exclude.tolist()):
        masked[row, [b for b in banned if b >= 0]] = float("-inf")
    expected = masked.topk(10, dim=1)
    got_scores, got_index = chunked_topk(query, candidates, 10, chunk, exclude)
    assert torch.equal(got_index, expected.indices)
    assert not (got_index == top.indices[:, :1]).any()  # each row's best item is gone


def test_topk_rejects_k_outside_the_catalog():
    with pytest.raises(ValueError, match="between 1 and the catalog size 4"):
        chunked_topk(torch.randn(1, 2), torch.randn(4, 2), 5)


@pytest.mark.parametrize("use_text, use_item_id", [(True, False), (True, True), (False, True)])
def test_chunked_and_subset_item_tables_equal_the_whole_table(use_text, use_item_id):
    net = small_net(use_text, use_item_id)
    with torch.no_grad():
        whole = net.item_table()
        assert_close_f32(net.item_table(chunk_size=7), whole)
        ids = torch.tensor([[0, 5, 5], [50, 1, 2]])
        assert_close_f32(net.item_vectors(ids), whole[ids])


def test_bucketed_padding_gives_the_scores_of_padding_everything_to_max_length():
    net = small_net()
    torch.manual_seed(3)
    sequences = [torch.randint(1, 51, (int(n),)).numpy() for n in torch.randint(3, 30, (40,))]
    examples = SequenceExamples(sequences, "train", max_seq_len=20)
    order = list(range(len(examples)))
    plain = examples[order]
    padded = torch.zeros(len(order), 20, dtype=torch.long)  # RecBole-style: everything padded to max length
    padded[:, :plain.item_seq.shape[1]] = plain.item_seq
    with torch.no_grad():
        table = net.item_table()
        expected = net.score(net.encode_sequences(padded, plain.seq_len, table), table)
        sampler = LengthBucketBatchSampler(examples.hist_len, batch_size=16, shuffle=True, seed=0)
        for batch_index in sampler:
            batch = examples[batch_index]
            assert batch.item_seq.shape[1] <= 20
            got = net.score(net.encode_sequences(batch.item_seq, batch.seq_len, table), table)
            assert_close_f32(got, expected[batch_index])


def test_module_evaluation_equals_plain_full_matrix_metrics():
    net = small_net()
    torch.manual_seed(4)
    sequences = [torch.randint(1, 51, (int(n),)).numpy() for n in torch.randint(3, 30, (60,))]
    examples = SequenceExamples(sequences, "test", max_seq_len=20)
    module = SeqRecModule(net, eval_chunk_size=9)
    batches = [examples[b] for b in LengthBucketBatchSampler(examples.hist_len, 16, shuffle=False)]
    fast = module.evaluate(batches)
    plain = RankingMetrics((10, 50))
    with torch.no_grad():
        for batch in batches:
            table = net.item_table()
            plain.update(net.score(net.encode_sequences(batch.item_seq, batch.seq_len, table), table), batch.target - 1)
    assert fast == pytest.approx(plain.compute(), abs=1e-9)


def test_sampled_softmax_is_the_corrected_cross_entropy_written_out():
    logits = torch.tensor([[2.0, 0.5, 1.0, 0.1], [0.3, 1.5, 0.2, 1.5]])  # 2 rows; candidates = 2 targets + 2 negatives
    candidate_ids = torch.tensor([7, 9, 9, 4])  # the second negative repeats row 1's target
    target = torch.tensor([7, 9])
    log_q = torch.tensor([0.1, 0.2, 0.3, 0.4])
    loss = sampled_softmax_loss(logits, candidate_ids, target, log_q)
    row0 = logits[0] - log_q
    row1 = (logits[1] - log_q)[[0, 1, 3]]  # column 2 is row 1's own target again: not a negative
    expected = (-(row0[0] - row0.logsumexp(0)) - (row1[1] - row1.logsumexp(0))) / 2
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)


def test_log_q_counts_in_batch_and_sampled_draws():
    counts = torch.tensor([0, 6, 3, 1, 0])  # item 4 never a target
    sampler = NegativeSampler(counts, num_negatives=8, sampling="uniform")
    got = sampler.log_expected_count(torch.tensor([1, 4]), batch_size=10)
    assert got[0].item() == pytest.approx(math.log(10 * 0.6 + 8 * 0.25))
    assert got[1].item() == pytest.approx(math.log(8 * 0.25))
    popular = NegativeSampler(counts, num_negatives=1000, sampling="popularity")
    torch.manual_seed(0)
    drawn = popular.sample()
    assert set(drawn.tolist()) <= {1, 2, 3}  # never padding, never an item with no training target
    assert (drawn == 1).float().mean().item() == pytest.approx(0.6, abs=0.05)


def _prefixes_and_windows(stride: int | None = 1):
    """All prefix examples and all windows of the same sequences, some longer than max_seq_len (20) + 3."""
    torch.manual_seed(5)
    sequences = [torch.randint(1, 51, (int(n),)).numpy() for n in torch.randint(3, 60, (30,))]
    prefixes = SequenceExamples(sequences, "train", max_seq_len=20)
    windows = PositionExamples(sequences, max_seq_len=20, window_stride=stride)  # stride 1: the prefixes' histories
    return prefixes[list(range(len(prefixes)))], windows[list(range(len(windows)))]


@pytest.mark.parametrize("use_text, use_item_id, similarity", [(True, False, "cosine"), (True, True, "cosine"),
                                                               (False, True, "dot")])
def test_position_wise_loss_is_the_sum_of_the_prefix_losses(use_text, use_item_id, similarity):
    net = small_net(use_text, use_item_id, similarity=similarity)  # eval(): no dropout, no gate noise
    module = SeqRecModule(net, loss_chunk_rows=64)  # several chunks: the checkpointed path
    prefixes, windows = _prefixes_and_windows()
    targets = int((windows.target > 0).sum())
    assert targets == len(prefixes.target) > 20 * 30 // 2
    params = [p for p in net.parameters() if p.requires_grad]
    prefix_sum = module.training_step(prefixes, 0) * len(prefixes.target)  # mean over examples, times their count
    position_sum = module.training_step(windows, 0) * targets  # one pass per window, mean over its targets
    assert position_sum.item() == pytest.approx(prefix_sum.item(), rel=1e-5)
    grads = [torch.autograd.grad(loss, params, allow_unused=True) for loss in (position_sum, prefix_sum)]
    assert_same_gradients(*grads)


@pytest.mark.parametrize("chunk", [1, 7, 40])
def test_chunked_loss_equals_the_full_softmax_and_never_keeps_all_logits(chunk):
    net = small_net()
    torch.manual_seed(6)
    seq_repr, target = torch.randn(40, 12, requires_grad=True), torch.randint(1, 51, (40,))
    table = net.item_table()
    with saved_sizes() as saved:
        chunked = chunked_next_item_loss(lambda rows: net.score(rows, table), seq_repr, target, chunk)
    full = next_item_loss(net.score(seq_repr, table), target)
    assert chunked.item() == pytest.approx(full.item(), rel=1e-6)
    for got, expected in zip(torch.autograd.grad(chunked, [seq_repr, table]), torch.autograd.grad(full, [seq_repr, table])):
        assert_close_f32(got, expected)
    assert max(saved) >= 40 * 50 if chunk == 40 else max(saved) < 40 * 50  # one chunk: plain, logits kept


def test_sampled_loss_of_windows_equals_that_of_the_prefix_batch():
    net = small_net()
    prefixes, windows = _prefixes_and_windows()
    module = SeqRecModule(net, loss="sampled", num_negatives=16, negative_sampling="popularity")
    module.set_training_targets(prefixes.target)
    torch.manual_seed(7)
    prefix_loss = module.training_step(prefixes, 0)
    torch.manual_seed(7)  # the same negatives
    assert module.training_step(windows, 0).item() == pytest.approx(prefix_loss.item(), rel=1e-5)


def test_pretraining_on_windows_keeps_both_tasks():
    net = small_net(use_item_id=False)
    prefixes, windows = _prefixes_and_windows(stride=None)
    # sequence-item: InfoNCE over the batch's targets, whichever example carries them
    windows_exact = _prefixes_and_windows(stride=1)[1]
    seq_item = PretrainModule(net, lambda_seq_seq=0).training_step(windows_exact, 0)
    assert seq_item.item() == pytest.approx(PretrainModule(net, lambda_seq_seq=0).training_step(prefixes, 0).item(), rel=1e-5)
    # sequence-sequence: each window's whole history against its augmented view, once per window
    module = PretrainModule(net, lambda_seq_seq=0.5)
    torch.manual_seed(8)
    both = module.training_step(windows, 0)
    torch.manual_seed(8)
    table = net.item_table()
    view_emb, view_len = module.view(windows, table)  # the same item-drop draws
    has_target = windows.target > 0
    seq_item = info_nce(net.encoder.hidden_states(table[windows.item_seq])[has_target], table[windows.target[has_target]],
                        net.temperature, same_target=windows.target[has_target])
    last_target = windows.target[torch.arange(len(windows.seq_len)), windows.seq_len - 1]
    seq_seq = info_nce(net.encode_sequences(windows.item_seq, windows.seq_len, table), net.encoder(view_emb, view_len),
                       net.temperature, same_target=last_target)
    assert both.item() == pytest.approx((seq_item + 0.5 * seq_seq).item(), rel=1e-5)


def test_pretraining_with_sampled_negatives_is_the_log_q_corrected_sampled_softmax():
    """``negatives > 0``: the sequence-item task is SeqRecModule's sampled loss over the same candidates."""
    net = small_net(use_item_id=False)
    windows = _prefixes_and_windows(stride=None)[1]
    targets = windows.target[windows.target > 0]
    pretrain = PretrainModule(net, lambda_seq_seq=0, negatives=16)
    pretrain.set_training_targets(targets)
    finetune = SeqRecModule(net, loss="sampled", num_negatives=16)
    finetune.set_training_targets(targets)
    torch.manual_seed(5)
    ours = pretrain.training_step(windows, 0)
    torch.manual_seed(5)  # the same negatives
    assert ours.item() == pytest.approx(finetune.training_step(windows, 0).item(), rel=1e-5)
    # and it is not the in-batch loss: the negatives count
    assert ours.item() != pytest.approx(PretrainModule(net, lambda_seq_seq=0).training_step(windows, 0).item(), rel=1e-3)
    # without item popularity there is no sampler: an error, never a silent fall-back to in-batch negatives
    with pytest.raises(RuntimeError, match="negatives > 0 needs item popularity"):
        PretrainModule(net, lambda_seq_seq=0, negatives=16).training_step(windows, 0)


def test_partial_item_table_equals_the_whole_table_on_its_rows_and_gradients():
    net = small_net(use_item_id=False)
    windows = _prefixes_and_windows(stride=None)[1]
    windows = type(windows)(*(t[:3] for t in windows))  # a few windows: most of the catalog is untouched
    ids = torch.unique(torch.cat([windows.item_seq.flatten(), windows.target.flatten()]))
    partial, whole = net.partial_item_table(ids), net.item_table()
    assert_close_f32(partial[ids], whole[ids])
    untouched = torch.ones(len(whole), dtype=torch.bool)
    untouched[ids] = False
    assert untouched.any() and not partial[untouched].any()
    # the pretraining step adapts only the touched items: same loss and gradients as with the whole table
    module = PretrainModule(net, lambda_seq_seq=0)
    fast = module.training_step(windows, 0)
    fast.backward()
    grads_fast = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    net.zero_grad()
    net.partial_item_table = lambda ids: net.item_table()  # the plain path: every item through the adapter
    plain = module.training_step(windows, 0)
    plain.backward()
    assert fast.item() == pytest.approx(plain.item(), rel=1e-5)
    for name, grad in grads_fast.items():
        assert_close_f32(grad, dict(net.named_parameters())[name].grad, rtol=1e-4)


@pytest.mark.parametrize("batch_kind", ["windows", "prefixes"])
def test_chunked_encoder_gives_the_one_pass_outputs_and_gradients_with_less_saved(batch_kind):
    net = small_net()  # eval(): no dropout, so the recomputed chunks see what the first pass saw
    prefixes, windows = _prefixes_and_windows(stride=None)
    batch = windows if batch_kind == "windows" else prefixes
    params = [p for p in net.parameters() if p.requires_grad]
    results = {}
    for chunk in (None, 3 * batch.item_seq.shape[1]):  # 3 rows at a time: many chunks
        module = SeqRecModule(net, encoder_chunk_tokens=chunk)
        table = net.item_table()
        with saved_sizes() as saved:
            seq_repr, target = module.training_queries(batch, table[batch.item_seq])
        loss = (seq_repr * torch.linspace(-1, 1, seq_repr.shape[1])).sum()
        results[chunk] = seq_repr, target, torch.autograd.grad(loss, params, allow_unused=True), sum(saved)
    (one, one_target, one_grads, one_saved), (chunked, chunked_target, chunked_grads, chunked_saved) = results.values()
    assert torch.equal(one_target, chunked_target) and len(one_target) == (batch.target > 0).sum()
    assert_close_f32(chunked, one)
    assert_same_gradients(chunked_grads, one_grads)
    assert chunked_saved < one_saved / 4  # the chunks' activations were dropped, not kept


@pytest.mark.parametrize("batch_kind", ["windows", "prefixes"])
def test_micro_batched_step_has_the_whole_batch_loss_and_gradients(batch_kind):
    net = small_net()  # text + ID: gradients reach the adapter through the item table, the IDs directly
    prefixes, windows = _prefixes_and_windows(stride=None)
    batch = windows if batch_kind == "windows" else prefixes
    params = [p for p in net.parameters() if p.requires_grad]
    rows_seen = []
    net.encoder.layers[0].register_forward_hook(lambda layer, args, out: rows_seen.append(len(args[0])))
    results = []
    for chunk, path in ((None, "whole"), (3 * batch.item_seq.shape[1], "micro_batches")):  # 3 rows at a time
        rows_seen.clear()
        module = SeqRecModule(net, encoder_chunk_tokens=chunk, loss_chunk_rows=5)
        assert module.loss_path(batch) == path  # the one place that decides
        with torch.no_grad():
            assert module.loss_path(batch) == "whole"  # no gradients: nothing to micro-batch
        loss = module.training_step(batch, 0)
        results.append((loss, torch.autograd.grad(loss, params, allow_unused=True), list(rows_seen)))
    (whole, whole_grads, whole_rows), (chunked, chunked_grads, chunked_rows) = results
    assert whole_rows == [len(batch.item_seq)] and max(chunked_rows) == 3 and sum(chunked_rows) == len(batch.item_seq)
    assert chunked.item() == pytest.approx(whole.item(), rel=1e-5)
    assert_same_gradients(chunked_grads, whole_grads)
    assert any(g is not None and g.abs().sum() > 0 for g in chunked_grads[:3])  # not vacuous: the adapter learns

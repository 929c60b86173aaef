"""Speed paths change no score: chunked ranking and top-K, chunked and subset item tables,
length-bucketed padding, and the sampled softmax's arithmetic, each against the plain path."""

from __future__ import annotations

import math

import pytest
import torch

from unisrec_x.data.sequences import LengthBucketBatchSampler, SequenceExamples
from unisrec_x.lit.module import SeqRecModule
from unisrec_x.metrics import RankingMetrics, target_ranks
from unisrec_x.model.unisrec import UniSRec
from unisrec_x.ranking import chunked_target_ranks, chunked_topk
from unisrec_x.sampled_softmax import NegativeSampler, sampled_softmax_loss


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
    torch.testing.assert_close(got_scores, top.values, atol=1e-5, rtol=0)
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
        torch.testing.assert_close(net.item_table(chunk_size=7), whole, atol=1e-5, rtol=0)
        ids = torch.tensor([[0, 5, 5], [50, 1, 2]])
        torch.testing.assert_close(net.item_vectors(ids), whole[ids], atol=1e-5, rtol=0)


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
            torch.testing.assert_close(got, expected[batch_index], atol=1e-5, rtol=0)


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

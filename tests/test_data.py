"""Data pipeline: text processors (fields, Alpaca, template blocking), packer, sources, exact resume."""

import json

import numpy as np
import pytest

from conftest import REPO_ROOT
from easylm_align import shuffling
from easylm_align.data import pipeline, processors, sources
from easylm_align.alpaca_templates import get_alpaca_template
from easylm_align.codemix import load_muse_dictionary
from easylm_align.data.packing import Packer
from easylm_align.tokenizer import DEMO_TOKENIZER, Tokenizer

EN_HI = REPO_ROOT / "dicts" / "en-hi.txt"


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(str(DEMO_TOKENIZER))


def processor(tok, **options):
    cfg = processors.default_config()
    cfg.update(options)
    return processors.build(cfg, tok)


# ------------------------------------------------------------------------------------------------
# fields
# ------------------------------------------------------------------------------------------------

def test_fields_syntax(tok):
    p = processor(tok, fields="[question+context],<|bos|>,answer")
    out = p({"question": "Who?", "context": "Ada wrote it.", "answer": "Ada"}, 0)
    prompt = tok.encode("Who? Ada wrote it.")
    answer = tok.encode("Ada")
    assert out.tokens == [tok.bos_id, *prompt, tok.bos_id, *answer, tok.eos_id]
    assert out.loss_mask == [0.0] + [0.0] * len(prompt) + [1.0] + [1.0] * len(answer) + [1.0]


def test_fields_reference_token_stream_doubles_bos_and_eos(tok):
    # COMMIT: the processor's BOS/EOS around each field's tokenizer call, which adds its own pair.
    p = processor(tok, fields="[question],answer", reference_token_stream=True)
    out = p({"question": "Who?", "answer": "Ada"}, 0)
    question, answer = tok.encode("Who?"), tok.encode("Ada")
    bos, eos = tok.bos_id, tok.eos_id
    assert out.tokens == [bos, bos, *question, eos, bos, *answer, eos, eos]
    assert out.loss_mask == [0.0] * (len(question) + 3) + [1.0] * (len(answer) + 3)
    no_specials = Tokenizer(str(DEMO_TOKENIZER), add_bos_token=False, add_eos_token=False)
    out = processor(no_specials, reference_token_stream=True)({"text": "Ada"}, 0)
    assert out.tokens == [bos, *answer, eos]  # the processor's own pair stays (COMMIT's defaults)


def test_fields_missing_field(tok):
    with pytest.raises(processors.ProcessorError, match="no field 'text'"):
        processor(tok)({"body": "x"}, 0)


def test_unknown_processor_and_bad_ratio(tok):
    with pytest.raises(ValueError, match="choose one of"):
        processor(tok, type="nope")
    with pytest.raises(ValueError, match="codemix_ratio"):
        processor(tok, codemix_dict_path=str(EN_HI), codemix_ratio=1.5)


# ------------------------------------------------------------------------------------------------
# Alpaca and template blocking
# ------------------------------------------------------------------------------------------------

EXAMPLE = {"instruction": "Give three tips for staying healthy.", "input": "",
           "output": "Eat a balanced diet, exercise regularly and sleep enough."}
WITH_INPUT = {"instruction": "Translate the sentence into French.", "input": "The house is red.",
              "output": "La maison est rouge."}


@pytest.mark.parametrize("example", [EXAMPLE, WITH_INPUT])
@pytest.mark.parametrize("reference", [False, True])
def test_alpaca_loss_mask_is_exactly_the_response_and_eos(tok, example, reference):
    out = processor(tok, alpaca=True, reference_token_stream=reference)(example, 0)
    template = get_alpaca_template("en")
    prompt = (template.with_input if example["input"] else template.without_input).format(**example)
    assert prompt.endswith("### Response:")
    ids, prompt_ids = tok.encode(prompt + example["output"]), tok.encode(prompt)
    assert out.tokens == [tok.bos_id, *ids, tok.eos_id]  # one string: the seam is tokenized as a whole
    # Ours trains the response's first token; COMMIT's mask also counted the prompt's own EOS.
    untrained = 1 + len(prompt_ids) + reference
    assert out.loss_mask == [0.0] * untrained + [1.0] * (len(ids) + 2 - untrained)


def test_alpaca_bad_records_and_language(tok):
    p = processor(tok, alpaca=True)
    with pytest.raises(processors.ProcessorError, match="'instruction'"):
        p({"output": "x"}, 0)
    with pytest.raises(processors.ProcessorError, match="'output'"):
        p({"instruction": "x", "input": ""}, 0)
    assert sum(p({"instruction": "x", "output": ""}, 0).loss_mask) == 1  # only EOS, as in real Alpaca
    reference = processor(tok, alpaca=True, reference_token_stream=True)
    assert sum(reference({"instruction": "x", "output": ""}, 0).loss_mask) == 0  # COMMIT: not even EOS
    with pytest.raises(ValueError, match="alpaca_lang"):
        processor(tok, alpaca=True, alpaca_lang="xx")


def test_template_blocking_at_ratio_one(tok):
    dictionary = load_muse_dictionary(EN_HI)
    p = processor(tok, alpaca=True, codemix_dict_path=str(EN_HI), codemix_ratio=1.0,
                  block_codemix_in_template=True)
    prompt, output, stats = p.prompt_and_output(WITH_INPUT, 7)
    fields = [WITH_INPUT[k] for k in ("instruction", "input", "output")]
    mixed, _ = p.mix(fields, 7)
    # The template is intact around the mixed slots; the response is the mixed output.
    assert prompt == get_alpaca_template("en").with_input.format(instruction=mixed[0], input=mixed[1])
    assert output == mixed[2]
    for original, new in zip(fields, mixed):  # every dictionary word became one of its translations
        for word, out in zip(original.split(), new.split()):
            core, out_core = word.strip(".,"), out.strip(".,")
            translations = dictionary.get(core)  # exact-case lookup, as the reference
            assert out_core in translations if translations else out_core == core, (word, out)
    assert stats.words_replaced == stats.words_in_dict > 0


def test_ratio_zero_equals_plain_alpaca_and_naive_mixes_the_template(tok):
    plain = processor(tok, alpaca=True)(WITH_INPUT, 3)
    zero = processor(tok, alpaca=True, codemix_dict_path=str(EN_HI), codemix_ratio=0.0)(WITH_INPUT, 3)
    assert zero.tokens == plain.tokens and zero.loss_mask == plain.loss_mask
    naive = processor(tok, alpaca=True, codemix_dict_path=str(EN_HI), codemix_ratio=1.0,
                      block_codemix_in_template=False)
    prompt = naive.prompt_and_output(WITH_INPUT, 3)[0]
    assert not prompt.startswith("Below is an instruction")  # the template's own words are mixed too


def test_alpaca_in_other_languages(tok):
    for lang in ("hi", "el", "th", "zh"):
        out = processor(tok, alpaca=True, alpaca_lang=lang)(EXAMPLE, 0)
        assert sum(out.loss_mask) == len(tok.encode(EXAMPLE["output"])) + 1


# ------------------------------------------------------------------------------------------------
# Packer
# ------------------------------------------------------------------------------------------------

def test_packer_separate_segments_rows_targets_positions():
    packer = Packer(seq_length=4, batch_size=2, separate_segments=True)
    packer.add([10, 11, 12], [0, 1, 1])
    packer.add([20, 21, 22, 23, 24], [0, 0, 1, 1, 1])
    assert not packer.ready()
    packer.add([30, 31], [1, 1])
    batch = packer.pop()
    np.testing.assert_array_equal(batch["input_tokens"], [[10, 11, 12, 20], [21, 22, 23, 24]])
    np.testing.assert_array_equal(batch["target_tokens"], [[11, 12, 20, 21], [22, 23, 24, 30]])
    np.testing.assert_array_equal(batch["segment_ids"], [[1, 1, 1, 2], [1, 1, 1, 1]])
    np.testing.assert_array_equal(batch["positions"], [[0, 1, 2, 0], [0, 1, 2, 3]])
    # Targets that cross into the next example are never trained.
    np.testing.assert_array_equal(batch["loss_masks"], [[1, 1, 0, 0], [1, 1, 1, 0]])
    # The last token stays as the next chunk's first input.
    state = packer.state_dict()
    assert state["tokens"] == [30, 31]
    other = Packer(4, 2, separate_segments=True)
    other.load_state_dict(state)
    assert other.state_dict() == state


def test_packer_default_is_one_causal_stream_like_the_reference():
    assert not pipeline.default_config().separate_segments
    packer = Packer(seq_length=3, batch_size=2)
    packer.add([1, 2], [0, 1])
    packer.add([3, 4, 5], [0, 1, 1])
    packer.add([6, 7], [0, 1])
    batch = packer.pop()
    np.testing.assert_array_equal(batch["input_tokens"], [[1, 2, 3], [4, 5, 6]])
    np.testing.assert_array_equal(batch["target_tokens"], [[2, 3, 4], [5, 6, 7]])
    np.testing.assert_array_equal(batch["segment_ids"], [[1, 1, 1], [1, 1, 1]])
    np.testing.assert_array_equal(batch["positions"], [[0, 1, 2], [0, 1, 2]])
    # The mask is the targets' own, also across example boundaries.
    np.testing.assert_array_equal(batch["loss_masks"], [[1, 0, 1], [1, 0, 1]])


# ------------------------------------------------------------------------------------------------
# Sources and the resumable iterator
# ------------------------------------------------------------------------------------------------

def data_config(path, dataset_type="json", **options):
    cfg = pipeline.default_config(dataset_type)
    cfg.update_from_flattened_dict({"json_dataset.path": str(path), "json_dataset.seq_length": 64,
                                    "json_dataset.batch_size": 4, **options})
    return cfg


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])


def test_alpaca_json_list_through_json_type(tok, test_data):
    cfg = data_config(test_data / "instruct_x/en.json", **{"text_processor.alpaca": True})
    batch = next(pipeline.DatasetIterator(cfg, tok))
    assert batch["input_tokens"].shape == (4, 64) and 0 < batch["loss_masks"].mean() < 1


@pytest.mark.parametrize("shuffle_buffer", [0, 7])
def test_resume_mid_epoch_gives_the_same_batches(tok, shuffle_buffer):
    cfg = data_config(sources.DEMO_CORPUS, **{"text_processor.codemix_dict_path": str(REPO_ROOT / "dicts/hi-en.txt"),
                                               "text_processor.codemix_ratio": 0.5, "shuffle_buffer": shuffle_buffer})
    full = take(pipeline.DatasetIterator(cfg, tok), 12)
    first = pipeline.DatasetIterator(cfg, tok)
    take(first, 5)
    state = json.loads(json.dumps(first.state_dict()))  # it is stored as JSON in checkpoints
    resumed = pipeline.DatasetIterator(cfg, tok)
    resumed.load_state_dict(state)
    assert_same_batches(full[5:], take(resumed, 7))


def test_shuffling_permutes_each_epoch_anew(tok, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": f"record {i} " + "the water is good " * 3}) + "\n" for i in range(6)))
    cfg = data_config(path, **{"json_dataset.batch_size": 1, "json_dataset.seq_length": 8})

    def records_read(shuffle_buffer, seed=0):
        """The record numbers of epochs 0 and 1, in the order the pipeline's source is read."""
        source = pipeline.DatasetIterator(cfg, tok).source
        return [[n for _, n, _ in shuffling.ordered(source.records, 0, shuffle_buffer, seed, epoch)]
                for epoch in (0, 1)]

    plain, _ = records_read(0)
    assert plain == list(range(6))  # the default keeps EasyLM's order
    first, second = records_read(6)
    assert sorted(first) == sorted(second) == plain and first != plain and first != second
    assert records_read(6, seed=1) != records_read(6)
    # The pipeline reads in that order: the tokens of its first batches follow the shuffled records.
    cfg.shuffle_buffer, cfg.shuffle_seed = 6, 0
    shuffled = pipeline.DatasetIterator(cfg, tok)
    first_text = tok.decode(next(shuffled)["input_tokens"][0].tolist())
    assert f"record {first[0]}" in first_text
    with pytest.raises(pipeline.DataError, match="shuffle_buffer=-1"):
        cfg.shuffle_buffer = -1
        pipeline.DatasetIterator(cfg, tok)


def test_epochs_loop_and_mix_differently(tok, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"text": "the water is good and the house is big " * 6}) + "\n")
    cfg = data_config(path, **{"text_processor.codemix_dict_path": str(EN_HI), "text_processor.codemix_ratio": 0.5,
                               "json_dataset.batch_size": 1})
    it = pipeline.DatasetIterator(cfg, tok)
    batches = take(it, 6)
    assert it.epoch >= 2
    assert len({b["input_tokens"].tobytes() for b in batches}) > 1


def test_worker_processes_give_identical_batches(tok, test_data):
    cfg = data_config(test_data / "instruct_x/en.json", **{
        "text_processor.alpaca": True, "text_processor.codemix_dict_path": str(EN_HI),
        "text_processor.codemix_ratio": 0.9})
    serial = take(pipeline.DatasetIterator(cfg, tok), 8)
    cfg.num_workers = 2
    parallel_it = pipeline.DatasetIterator(cfg, tok)
    try:
        assert_same_batches(serial, take(parallel_it, 8))
    finally:
        parallel_it.close()


def test_huggingface_source_on_local_json(tok, test_data):
    cfg = data_config("", dataset_type="huggingface", **{
        "huggingface_dataset.path": "json", "huggingface_dataset.data_files": str(test_data / "instruct_x/en.json"),
        "huggingface_dataset.seq_length": 32, "huggingface_dataset.batch_size": 2, "text_processor.alpaca": True})
    it = pipeline.DatasetIterator(cfg, tok)
    first = take(it, 3)
    resumed = pipeline.DatasetIterator(cfg, tok)
    it2 = pipeline.DatasetIterator(cfg, tok)
    take(it2, 1)
    resumed.load_state_dict(it2.state_dict())
    assert_same_batches(first[1:], take(resumed, 2))


def test_source_errors(tok, tmp_path):
    with pytest.raises(pipeline.DataError, match="matches no file"):
        pipeline.DatasetIterator(data_config(tmp_path / "none-*.jsonl"), tok)
    with pytest.raises(pipeline.DataError, match="choose one of"):
        pipeline.DatasetIterator(data_config(tmp_path, dataset_type="parquetz"), tok)
    with pytest.raises(pipeline.DataError, match="huggingface_dataset.data_files"):
        pipeline.DatasetIterator(data_config("", dataset_type="huggingface", **{
            "huggingface_dataset.path": "json", "huggingface_dataset.data_files": str(tmp_path / "x.json")}), tok)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(pipeline.DataError, match="no examples"):
        next(pipeline.DatasetIterator(data_config(empty), tok))
    alpaca = tmp_path / "a.jsonl"
    alpaca.write_text(json.dumps(EXAMPLE) + "\n" + json.dumps({"instruction": "x"}) + "\n")
    with pytest.raises(pipeline.DataError, match=f"{alpaca}:2: .*'output'"):
        take(pipeline.DatasetIterator(data_config(alpaca, **{"text_processor.alpaca": True}), tok), 2)

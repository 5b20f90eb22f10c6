//! Tests of the data pipeline with the real Phi-3 tokenizer and chat template.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use philo_text::{ChatMessage, ChatTemplate, Tokenizer};
use philo_train::data::{
    load_dataset, load_records, parse_records, split_eval, tokenize_records, Batch, BatchPlan,
    BatchPosition, DataError, DataFormat, DataOptions, Example, PrefetchLimit, Prefetcher, Record,
    RecordContent, RowDataset, IGNORE_INDEX,
};

const TOKENIZER_JSON: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../assets/phi-3-tokenizer/tokenizer.json"
);
const TOKENIZER_CONFIG: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../assets/phi-3-tokenizer/tokenizer_config.json"
);
const TOY_DATASET: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../examples/toy_dataset.jsonl"
);
const TOY_EVAL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/toy_eval.jsonl");

const END: u32 = 32007;
const ENDOFTEXT: u32 = 32000;
const ASSISTANT: u32 = 32001;
const USER: u32 = 32010;

fn tokenizer() -> Tokenizer {
    Tokenizer::from_file(Path::new(TOKENIZER_JSON)).unwrap()
}

fn template() -> ChatTemplate {
    ChatTemplate::from_tokenizer_config(Path::new(TOKENIZER_CONFIG)).unwrap()
}

/// A temporary directory holding one dataset file.
struct DataFile {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

fn data_file(name: &str, contents: &str) -> DataFile {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    std::fs::write(&path, contents).unwrap();
    DataFile { _dir: dir, path }
}

fn options(max_seq_length: usize) -> DataOptions {
    DataOptions {
        max_seq_length,
        ..DataOptions::default()
    }
}

fn load(
    contents: &str,
    opts: &DataOptions,
) -> Result<philo_train::data::TokenizedDataset, DataError> {
    let file = data_file("data.jsonl", contents);
    load_dataset(&file.path, &tokenizer(), &template(), opts)
}

/// The labelled tokens of an example, as decoded text, one string per
/// contiguous run of labelled positions; also checks each label equals its id.
fn labelled_runs(example: &Example, tokenizer: &Tokenizer) -> Vec<String> {
    assert_eq!(example.input_ids.len(), example.labels.len());
    let mut runs = Vec::new();
    let mut current: Vec<u32> = Vec::new();
    for (&id, &label) in example.input_ids.iter().zip(&example.labels) {
        if label == IGNORE_INDEX {
            if !current.is_empty() {
                runs.push(tokenizer.decode(&current, false).unwrap());
                current.clear();
            }
        } else {
            assert_eq!(label, i64::from(id), "a label differs from its token id");
            current.push(id);
        }
    }
    if !current.is_empty() {
        runs.push(tokenizer.decode(&current, false).unwrap());
    }
    runs
}

fn conversation(record: &Record) -> &[ChatMessage] {
    match &record.content {
        RecordContent::Conversation(messages) => messages,
        RecordContent::Text(_) => panic!("expected a conversation, got text"),
    }
}

/// The example's ids must be the tokenisation of the rendered conversation.
fn assert_rendered(example: &Example, messages: &[ChatMessage]) {
    let rendered = template().render(messages, false).unwrap();
    assert_eq!(
        example.input_ids,
        tokenizer().encode(&rendered, false).unwrap()
    );
}

#[test]
fn messages_format_labels_exactly_the_assistant_reply_and_end() {
    let data = concat!(
        r#"{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What sound does a cow make?"}, {"role": "assistant", "content": "The cow says moo."}]}"#,
        "\n",
        r#"{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! 1 2 3, déjà vu."}, {"role": "user", "content": "And a dog?"}, {"role": "assistant", "content": "The dog says woof."}]}"#,
        "\n"
    );
    let file = data_file("chat.jsonl", data);
    let records = load_records(&file.path, None).unwrap();
    assert_eq!(records.len(), 2);
    assert_eq!(
        conversation(&records[0]),
        &[
            ChatMessage::system("Be brief."),
            ChatMessage::user("What sound does a cow make?"),
            ChatMessage::assistant("The cow says moo."),
        ]
    );
    assert_eq!(records[1].origin, format!("{}:2", file.path.display()));

    let tok = tokenizer();
    let set = tokenize_records(&records, &tok, &template(), &options(1024)).unwrap();
    assert_eq!(set.examples.len(), 2);
    assert_eq!(set.eos_id, ENDOFTEXT);

    let first = &set.examples[0];
    assert_rendered(first, conversation(&records[0]));
    assert_eq!(labelled_runs(first, &tok), vec!["The cow says moo.<|end|>"]);
    // The assistant header is not labelled, the <|end|> after the reply is,
    // the closing <|endoftext|> is not.
    let assistant_at = first
        .input_ids
        .iter()
        .position(|&id| id == ASSISTANT)
        .unwrap();
    assert_eq!(first.labels[assistant_at], IGNORE_INDEX);
    assert_ne!(first.labels[assistant_at + 1], IGNORE_INDEX);
    assert_eq!(*first.input_ids.last().unwrap(), ENDOFTEXT);
    assert_eq!(*first.labels.last().unwrap(), IGNORE_INDEX);
    let last_end = first.input_ids.iter().rposition(|&id| id == END).unwrap();
    assert_eq!(first.labels[last_end], i64::from(END));

    let second = &set.examples[1];
    assert_rendered(second, conversation(&records[1]));
    assert_eq!(
        labelled_runs(second, &tok),
        vec!["Hello! 1 2 3, déjà vu.<|end|>", "The dog says woof.<|end|>"]
    );
    assert_eq!(set.stats.records, 2);
    assert_eq!(set.stats.truncated, 0);
    assert_eq!(set.stats.skipped_no_loss, 0);
    assert_eq!(set.stats.tokens, first.len() + second.len());
    assert_eq!(
        set.stats.loss_tokens,
        first.loss_tokens() + second.loss_tokens()
    );
}

#[test]
fn reply_starting_with_whitespace_does_not_label_the_header() {
    // <|assistant|> swallows the whitespace after it (rstrip), so the header
    // token reaches into the reply's text; it must still not be labelled.
    let data = r#"{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "\n  Hello there."}]}"#;
    let set = load(data, &options(1024)).unwrap();
    let example = &set.examples[0];
    let assistant_at = example
        .input_ids
        .iter()
        .position(|&id| id == ASSISTANT)
        .unwrap();
    assert_eq!(example.labels[assistant_at], IGNORE_INDEX);
    assert_eq!(
        labelled_runs(example, &tokenizer()),
        vec!["Hello there.<|end|>"]
    );
}

#[test]
fn sharegpt_conversations_map_roles() {
    let data = concat!(
        r#"{"conversations": [{"from": "system", "value": "You know animals."}, {"from": "human", "value": "What does a duck say?"}, {"from": "gpt", "value": "The duck says quack."}]}"#,
        "\n"
    );
    let file = data_file("sharegpt.jsonl", data);
    let records = load_records(&file.path, None).unwrap();
    assert_eq!(
        conversation(&records[0]),
        &[
            ChatMessage::system("You know animals."),
            ChatMessage::user("What does a duck say?"),
            ChatMessage::assistant("The duck says quack."),
        ]
    );
    // Forcing the format reads the same.
    assert_eq!(
        load_records(&file.path, Some(DataFormat::ShareGpt)).unwrap(),
        records
    );
    let tok = tokenizer();
    let set = tokenize_records(&records, &tok, &template(), &options(1024)).unwrap();
    assert_rendered(&set.examples[0], conversation(&records[0]));
    assert_eq!(
        labelled_runs(&set.examples[0], &tok),
        vec!["The duck says quack.<|end|>"]
    );
}

#[test]
fn alpaca_with_and_without_input() {
    let data = concat!(
        r#"{"instruction": "Name the sound.", "input": "a sheep", "output": "The sheep says baa."}"#,
        "\n",
        r#"{"instruction": "Say hi.", "output": "Hi!"}"#,
        "\n",
        r#"{"instruction": "Say bye.", "input": "", "output": "Bye!"}"#,
        "\n",
        r#"{"instruction": "Say yes.", "input": null, "output": "Yes."}"#,
        "\n"
    );
    let file = data_file("alpaca.jsonl", data);
    let records = load_records(&file.path, None).unwrap();
    let expect = [
        ("Name the sound.\n\na sheep", "The sheep says baa."),
        ("Say hi.", "Hi!"),
        ("Say bye.", "Bye!"),
        ("Say yes.", "Yes."),
    ];
    assert_eq!(records.len(), expect.len());
    for (record, (user, assistant)) in records.iter().zip(expect) {
        assert_eq!(
            conversation(record),
            &[ChatMessage::user(user), ChatMessage::assistant(assistant)]
        );
    }
    let tok = tokenizer();
    let set = tokenize_records(&records, &tok, &template(), &options(1024)).unwrap();
    for ((example, record), (_, assistant)) in set.examples.iter().zip(&records).zip(expect) {
        assert_rendered(example, conversation(record));
        assert_eq!(
            labelled_runs(example, &tok),
            vec![format!("{assistant}<|end|>")]
        );
    }
}

#[test]
fn prompt_completion_becomes_user_and_assistant() {
    let data = r#"{"prompt": "What does an owl say?", "completion": "The owl says hoot."}"#;
    let file = data_file("pc.jsonl", data);
    let records = load_records(&file.path, None).unwrap();
    assert_eq!(
        conversation(&records[0]),
        &[
            ChatMessage::user("What does an owl say?"),
            ChatMessage::assistant("The owl says hoot.")
        ]
    );
    let tok = tokenizer();
    let set = tokenize_records(&records, &tok, &template(), &options(1024)).unwrap();
    assert_eq!(set.examples[0].input_ids[0], USER);
    assert_eq!(
        labelled_runs(&set.examples[0], &tok),
        vec!["The owl says hoot.<|end|>"]
    );
}

#[test]
fn text_format_is_raw_tokens_plus_eos_all_labelled() {
    let data = concat!(
        r#"{"text": "Once upon a time, a cow said moo."}"#,
        "\n\n   \n",
        r#"{"text": "The end."}"#,
        "\n"
    );
    let file = data_file("text.jsonl", data);
    let records = load_records(&file.path, None).unwrap();
    assert_eq!(records.len(), 2, "blank lines are skipped");
    assert_eq!(
        records[0].content,
        RecordContent::Text("Once upon a time, a cow said moo.".to_string())
    );
    assert_eq!(records[1].origin, format!("{}:4", file.path.display()));

    let tok = tokenizer();
    let set = tokenize_records(&records, &tok, &template(), &options(1024)).unwrap();
    let mut expected = tok
        .encode("Once upon a time, a cow said moo.", false)
        .unwrap();
    expected.push(ENDOFTEXT);
    assert_eq!(set.examples[0].input_ids, expected);
    let labels: Vec<i64> = expected.iter().map(|&id| i64::from(id)).collect();
    assert_eq!(set.examples[0].labels, labels);
    assert_eq!(set.stats.loss_tokens, set.stats.tokens);
}

#[test]
fn json_array_files_and_forced_format() {
    let data = r#"[
        {"prompt": "p1", "completion": "c1", "text": "ignored"},
        {"prompt": "p2", "completion": "c2", "text": "also ignored"}
    ]"#;
    let file = data_file("data.json", data);
    let records = load_records(&file.path, None).unwrap();
    assert_eq!(records.len(), 2);
    assert_eq!(
        records[1].origin,
        format!("{} record 2", file.path.display())
    );
    assert_eq!(
        conversation(&records[0]),
        &[ChatMessage::user("p1"), ChatMessage::assistant("c1")]
    );
    let forced = load_records(&file.path, Some(DataFormat::Text)).unwrap();
    assert_eq!(
        forced[1].content,
        RecordContent::Text("also ignored".to_string())
    );
}

#[test]
fn data_format_parses_from_cli_names() {
    let cases = [
        ("messages", DataFormat::Messages),
        ("sharegpt", DataFormat::ShareGpt),
        ("alpaca", DataFormat::Alpaca),
        ("prompt_completion", DataFormat::PromptCompletion),
        ("prompt-completion", DataFormat::PromptCompletion),
        ("text", DataFormat::Text),
        ("Messages", DataFormat::Messages),
    ];
    for (name, format) in cases {
        assert_eq!(name.parse::<DataFormat>().unwrap(), format, "{name}");
    }
    for format in DataFormat::ALL {
        assert_eq!(format.to_string().parse::<DataFormat>().unwrap(), format);
    }
    let error = "chatml".parse::<DataFormat>().unwrap_err().to_string();
    assert!(
        error.contains("\"chatml\"") && error.contains("sharegpt"),
        "{error}"
    );
}

#[test]
fn train_on_prompt_labels_every_token() {
    let data = r#"{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Cow?"}, {"role": "assistant", "content": "Moo."}]}"#;
    let opts = DataOptions {
        train_on_prompt: true,
        ..options(1024)
    };
    let set = load(data, &opts).unwrap();
    let example = &set.examples[0];
    let all: Vec<i64> = example.input_ids.iter().map(|&id| i64::from(id)).collect();
    assert_eq!(example.labels, all);
    assert_eq!(set.stats.loss_tokens, example.len());
    // And without it the prompt is masked.
    let masked = load(data, &options(1024)).unwrap();
    assert!(masked.examples[0].loss_tokens() < example.len());
}

#[test]
fn truncation_keeps_the_start_and_is_counted() {
    let long_reply = "The cow says moo. ".repeat(20);
    let data = format!(
        "{}\n{}\n{}\n",
        serde_json::json!({"messages": [{"role": "user", "content": "Cow?"}, {"role": "assistant", "content": long_reply}]}),
        serde_json::json!({"messages": [{"role": "user", "content": "A very long question that goes on and on about many animals and the sounds that they make on the farm"}, {"role": "assistant", "content": "Moo."}]}),
        serde_json::json!({"messages": [{"role": "user", "content": "Dog?"}, {"role": "assistant", "content": "Woof."}]}),
    );
    let max = 16;
    let tok = tokenizer();
    let file = data_file("long.jsonl", &data);
    let records = load_records(&file.path, None).unwrap();
    let full = tokenize_records(&records, &tok, &template(), &options(4096)).unwrap();
    let set = tokenize_records(&records, &tok, &template(), &options(max)).unwrap();

    assert_eq!(set.stats.records, 3);
    assert_eq!(
        set.stats.truncated, 2,
        "records 1 and 2 are longer than {max}"
    );
    assert_eq!(set.stats.skipped_no_loss, 1, "record 2 has no reply left");
    assert_eq!(set.examples.len(), 2);
    let cut = &set.examples[0];
    assert_eq!(cut.len(), max);
    assert_eq!(cut.input_ids[..], full.examples[0].input_ids[..max]);
    assert_eq!(cut.labels[..], full.examples[0].labels[..max]);
    assert_eq!(set.examples[1], full.examples[2]);
    assert_eq!(set.stats.tokens, max + full.examples[2].len());
}

#[test]
fn every_sample_too_long_is_a_clear_error() {
    let data = concat!(
        r#"{"messages": [{"role": "user", "content": "A long question about cows and their sounds"}, {"role": "assistant", "content": "Moo."}]}"#,
        "\n",
        r#"{"messages": [{"role": "user", "content": "Only a question, no answer"}]}"#,
        "\n"
    );
    let error = load(data, &options(4)).unwrap_err();
    assert!(
        matches!(error, DataError::NoSamples { records: 2, .. }),
        "{error:?}"
    );
    let message = error.to_string();
    assert!(
        message.contains("longer than max_seq_length (4 tokens)"),
        "{message}"
    );
    assert!(message.contains("--max_seq_length"), "{message}");
    assert!(message.contains("no assistant turn"), "{message}");
}

#[test]
fn conversation_without_assistant_turn_is_skipped() {
    let data = concat!(
        r#"{"messages": [{"role": "user", "content": "Only a question"}]}"#,
        "\n",
        r#"{"messages": [{"role": "user", "content": "Cow?"}, {"role": "assistant", "content": "Moo."}]}"#,
        "\n"
    );
    let set = load(data, &options(1024)).unwrap();
    assert_eq!(set.examples.len(), 1);
    assert_eq!(set.stats.skipped_no_loss, 1);
    assert_eq!(
        labelled_runs(&set.examples[0], &tokenizer()),
        vec!["Moo.<|end|>"]
    );
}

fn numbered_examples(lengths: &[usize]) -> Vec<Example> {
    lengths
        .iter()
        .enumerate()
        .map(|(i, &len)| Example {
            input_ids: (0..len).map(|t| (i * 1000 + t) as u32).collect(),
            labels: (0..len)
                .map(|t| {
                    if t % 2 == 0 {
                        (i * 1000 + t) as i64
                    } else {
                        IGNORE_INDEX
                    }
                })
                .collect(),
        })
        .collect()
}

/// Splits a row back into its examples by segment id.
fn segments_of(row: &philo_train::data::Row) -> Vec<Example> {
    let mut out: Vec<Example> = Vec::new();
    for ((&id, &label), &segment) in row.input_ids.iter().zip(&row.labels).zip(&row.segment_ids) {
        let segment = segment as usize;
        assert!(
            segment >= 1 && segment <= out.len() + 1,
            "segments count up from 1"
        );
        if segment == out.len() + 1 {
            out.push(Example::default());
        }
        out[segment - 1].input_ids.push(id);
        out[segment - 1].labels.push(label);
    }
    out
}

#[test]
fn packing_fills_rows_with_distinct_segments() {
    let lengths = [10, 3, 25, 7, 7, 30, 1, 12, 18, 5, 9, 22];
    let examples = numbered_examples(&lengths);
    let max = 32;
    let rows = RowDataset::packed(examples.clone(), max, 0);
    assert!(rows.len() < examples.len(), "packing should merge rows");
    assert!(rows.len() >= lengths.iter().sum::<usize>().div_ceil(max));
    assert!(rows.rows().iter().any(|row| row.segments() >= 3));

    let mut seen: Vec<Example> = Vec::new();
    for row in rows.rows() {
        assert!(row.len() <= max, "row of {} tokens", row.len());
        assert_eq!(row.input_ids.len(), row.labels.len());
        assert_eq!(row.input_ids.len(), row.segment_ids.len());
        let segments = segments_of(row);
        assert_eq!(segments.len(), row.segments());
        seen.extend(segments);
    }
    // Every example appears exactly once, intact.
    let key = |e: &Example| e.input_ids.clone();
    let mut expected = examples.clone();
    expected.sort_by_key(key);
    seen.sort_by_key(key);
    assert_eq!(seen, expected);

    // Deterministic.
    assert_eq!(RowDataset::packed(examples.clone(), max, 0), rows);

    // Without packing: one example per row, segment 1.
    let plain = RowDataset::from_options(
        examples.clone(),
        &DataOptions {
            packing: false,
            ..options(max)
        },
        0,
    );
    assert_eq!(plain.len(), examples.len());
    for (row, example) in plain.rows().iter().zip(&examples) {
        assert_eq!(row.input_ids, example.input_ids);
        assert!(row.segment_ids.iter().all(|&s| s == 1));
    }
}

#[test]
fn packing_real_dataset_respects_max_seq_length() {
    let opts = DataOptions {
        packing: true,
        ..options(128)
    };
    let set = load_dataset(Path::new(TOY_DATASET), &tokenizer(), &template(), &opts).unwrap();
    let rows = RowDataset::from_options(set.examples.clone(), &opts, set.eos_id);
    assert!(rows.len() * 3 < set.examples.len(), "{} rows", rows.len());
    assert!(rows.rows().iter().all(|row| row.len() <= 128));
    let tokens: usize = rows.rows().iter().map(|row| row.len()).sum();
    assert_eq!(tokens, set.stats.tokens);
}

#[test]
fn batch_pads_right_with_pad_label_and_segment_zero() {
    let examples = numbered_examples(&[4, 2, 6, 3]);
    // Best fit with rows of 6: [6], [4, 2], [3].
    let rows = RowDataset::packed(examples, 6, 99);
    let batch: Batch = rows.batch(&[0, 1, 2]);
    assert_eq!(batch.batch_size(), 3);
    let width = rows.rows()[..3].iter().map(|r| r.len()).max().unwrap();
    assert_eq!(batch.seq_len(), width);
    for (b, &i) in [0usize, 1, 2].iter().enumerate() {
        let row = &rows.rows()[i];
        let n = row.len();
        assert_eq!(batch.input_ids[b].len(), width);
        assert_eq!(batch.labels[b].len(), width);
        assert_eq!(batch.segment_ids[b].len(), width);
        assert_eq!(batch.input_ids[b][..n], row.input_ids[..]);
        assert_eq!(batch.labels[b][..n], row.labels[..]);
        assert_eq!(batch.segment_ids[b][..n], row.segment_ids[..]);
        assert!(batch.input_ids[b][n..].iter().all(|&id| id == 99));
        assert!(batch.labels[b][n..].iter().all(|&l| l == IGNORE_INDEX));
        assert!(batch.segment_ids[b][n..].iter().all(|&s| s == 0));
        assert!(batch.segment_ids[b][..n].iter().all(|&s| s >= 1));
    }
    let loss: usize = [0usize, 1, 2]
        .iter()
        .map(|&i| {
            rows.rows()[i]
                .labels
                .iter()
                .filter(|&&l| l != IGNORE_INDEX)
                .count()
        })
        .sum();
    assert_eq!(batch.loss_tokens(), loss);
}

#[test]
fn position_ids_restart_per_segment() {
    let batch = Batch {
        input_ids: vec![vec![5; 7], vec![5; 7]],
        labels: vec![vec![IGNORE_INDEX; 7], vec![IGNORE_INDEX; 7]],
        segment_ids: vec![vec![1, 1, 1, 2, 2, 3, 0], vec![1, 1, 1, 1, 0, 0, 0]],
    };
    assert_eq!(
        batch.position_ids(),
        vec![vec![0, 1, 2, 0, 1, 0, 0], vec![0, 1, 2, 3, 0, 0, 0]]
    );
    let tensors = batch.to_tensors(&candle_core::Device::Cpu).unwrap();
    assert_eq!(tensors.input_ids.dims(), &[2, 7]);
    assert_eq!(tensors.labels.dtype(), candle_core::DType::I64);
    assert_eq!(
        tensors.position_ids.to_vec2::<u32>().unwrap(),
        batch.position_ids()
    );
    assert_eq!(
        tensors.segment_ids.to_vec2::<u32>().unwrap(),
        batch.segment_ids
    );
}

#[test]
fn batch_plan_is_deterministic_and_resumable() {
    let plan = BatchPlan::new(10, 4, 7).unwrap();
    assert_eq!(plan.batches_per_epoch(), 3);
    for epoch in 0..3 {
        let batches: Vec<Vec<usize>> = (0..3).map(|i| plan.batch_indices(epoch, i)).collect();
        assert_eq!(
            batches.iter().map(Vec::len).collect::<Vec<_>>(),
            vec![4, 4, 2]
        );
        let mut all: Vec<usize> = batches.concat();
        assert_eq!(all, plan.epoch_order(epoch));
        all.sort();
        assert_eq!(all, (0..10).collect::<Vec<_>>(), "each row once per epoch");
    }
    assert!(plan.batch_indices(0, 3).is_empty());

    // Same seed, same batches; different epochs and seeds shuffle differently.
    let again = BatchPlan::new(10, 4, 7).unwrap();
    assert_eq!(plan.epoch_order(2), again.epoch_order(2));
    assert_ne!(plan.epoch_order(0), plan.epoch_order(1));
    assert_ne!(
        plan.epoch_order(0),
        BatchPlan::new(10, 4, 8).unwrap().epoch_order(0)
    );
    assert_ne!(plan.epoch_order(0), (0..10).collect::<Vec<_>>());

    // Walking positions: (0,0) (0,1) (0,2) (1,0) ...
    let mut position = BatchPosition::START;
    let mut walked = Vec::new();
    for step in 0..7 {
        assert_eq!(plan.position_of_step(step), position);
        assert_eq!(plan.step_of_position(position), step);
        walked.push(plan.batch_indices(position.epoch, position.index));
        position = plan.next_position(position);
    }
    assert_eq!(position, BatchPosition::new(2, 1));
    // A resumed plan from (1, 1) continues with the same batches.
    let resumed = BatchPlan::new(10, 4, 7).unwrap();
    let mut position = BatchPosition::new(1, 1);
    for expected in &walked[4..] {
        assert_eq!(
            &resumed.batch_indices(position.epoch, position.index),
            expected
        );
        position = resumed.next_position(position);
    }
    assert_eq!(
        plan.normalize(BatchPosition::new(0, 7)),
        BatchPosition::new(2, 1)
    );

    assert!(BatchPlan::new(0, 4, 0).is_err());
    assert!(BatchPlan::new(4, 0, 0).is_err());
}

#[test]
fn split_eval_is_deterministic_and_keeps_both_sides() {
    let examples = numbered_examples(&[3; 20]);
    let (train, eval) = split_eval(examples.clone(), 0.1, 3);
    assert_eq!((train.len(), eval.len()), (18, 2));
    let (train2, eval2) = split_eval(examples.clone(), 0.1, 3);
    assert_eq!((&train, &eval), (&train2, &eval2));
    let (_, eval_other_seed) = split_eval(examples.clone(), 0.1, 4);
    assert_ne!(eval, eval_other_seed);
    let mut union: Vec<Example> = train.iter().chain(&eval).cloned().collect();
    union.sort_by_key(|e| e.input_ids.clone());
    assert_eq!(union, examples);

    // A tiny fraction still holds out one; a huge one still trains on one.
    let (train, eval) = split_eval(examples.clone(), 0.001, 3);
    assert_eq!((train.len(), eval.len()), (19, 1));
    let (train, eval) = split_eval(examples.clone(), 0.999, 3);
    assert_eq!((train.len(), eval.len()), (1, 19));
    let two = numbered_examples(&[1, 2]);
    let (train, eval) = split_eval(two, 0.5, 0);
    assert_eq!((train.len(), eval.len()), (1, 1));
    // No split asked for, or nothing to split.
    assert_eq!(
        split_eval(examples.clone(), 0.0, 3),
        (examples.clone(), Vec::new())
    );
    let one = numbered_examples(&[4]);
    assert_eq!(split_eval(one.clone(), 0.5, 3), (one, Vec::new()));
}

fn direct_batches(
    rows: &RowDataset,
    plan: &BatchPlan,
    mut position: BatchPosition,
    count: usize,
) -> Vec<(BatchPosition, Batch)> {
    (0..count)
        .map(|_| {
            let batch = rows.batch(&plan.batch_indices(position.epoch, position.index));
            let item = (position, batch);
            position = plan.next_position(position);
            item
        })
        .collect()
}

#[test]
fn prefetcher_yields_the_planned_batches_in_order() {
    let rows = Arc::new(RowDataset::unpacked(
        numbered_examples(&[3, 5, 2, 8, 1, 4, 6]),
        0,
    ));
    let plan = BatchPlan::new(rows.len(), 3, 11).unwrap();
    assert_eq!(plan.batches_per_epoch(), 3);

    let prefetched: Vec<_> = Prefetcher::spawn(
        rows.clone(),
        plan,
        BatchPosition::START,
        PrefetchLimit::Epochs(2),
        2,
    )
    .unwrap()
    .collect();
    assert_eq!(
        prefetched,
        direct_batches(&rows, &plan, BatchPosition::START, 6)
    );

    // Resuming mid-run with a batch budget.
    let resumed: Vec<_> = Prefetcher::spawn(
        rows.clone(),
        plan,
        BatchPosition::new(1, 2),
        PrefetchLimit::Batches(4),
        1,
    )
    .unwrap()
    .collect();
    assert_eq!(
        resumed,
        direct_batches(&rows, &plan, BatchPosition::new(1, 2), 4)
    );
    assert_eq!(resumed[1].0, BatchPosition::new(2, 0));

    // Epoch limit when resuming in the last epoch: only what is left.
    let tail: Vec<_> = Prefetcher::spawn(
        rows.clone(),
        plan,
        BatchPosition::new(1, 1),
        PrefetchLimit::Epochs(2),
        4,
    )
    .unwrap()
    .collect();
    assert_eq!(
        tail,
        direct_batches(&rows, &plan, BatchPosition::new(1, 1), 2)
    );

    // A plan for a different number of rows is refused.
    let wrong = BatchPlan::new(rows.len() + 1, 3, 11).unwrap();
    let error = Prefetcher::spawn(
        rows,
        wrong,
        BatchPosition::START,
        PrefetchLimit::Epochs(1),
        1,
    )
    .unwrap_err();
    assert!(
        matches!(
            error,
            DataError::PlanMismatch {
                plan: 8,
                dataset: 7
            }
        ),
        "{error:?}"
    );
}

#[test]
fn dropping_the_prefetcher_stops_its_thread() {
    let rows = Arc::new(RowDataset::unpacked(numbered_examples(&[4; 16]), 0));
    let plan = BatchPlan::new(rows.len(), 2, 0).unwrap();
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        // Unbounded batches: the worker blocks on the full channel until dropped.
        let mut prefetcher = Prefetcher::spawn(
            rows,
            plan,
            BatchPosition::START,
            PrefetchLimit::Batches(usize::MAX),
            1,
        )
        .unwrap();
        let first = prefetcher.next().unwrap();
        assert_eq!(first.0, BatchPosition::START);
        std::thread::sleep(Duration::from_millis(50));
        drop(prefetcher);
        done.send(()).unwrap();
    });
    finished
        .recv_timeout(Duration::from_secs(20))
        .expect("dropping the Prefetcher should stop and join its thread");
}

#[test]
fn malformed_json_line_names_file_and_line() {
    let data = concat!(
        r#"{"prompt": "a", "completion": "b"}"#,
        "\n\n",
        r#"{"prompt": "c", "completion": }"#,
        "\n"
    );
    let file = data_file("broken.jsonl", data);
    let error = load_records(&file.path, None).unwrap_err();
    let message = error.to_string();
    let location = format!("{}:3:", file.path.display());
    assert!(message.starts_with(&location), "{message}");
    assert!(message.contains("not valid JSON"), "{message}");
}

#[test]
fn malformed_json_array_names_line_and_column() {
    let data = "[\n  {\"text\": \"a\"},\n  {\"text\": \"b\",,}\n]\n";
    let file = data_file("broken.json", data);
    let error = load_records(&file.path, None).unwrap_err();
    assert!(
        matches!(error, DataError::JsonArray { line: 3, .. }),
        "{error:?}"
    );
    let message = error.to_string();
    assert!(
        message.contains(&format!("{}:3:", file.path.display())),
        "{message}"
    );
}

#[test]
fn record_missing_fields_is_named_with_expected_fields() {
    let data = concat!(
        r#"{"prompt": "a", "completion": "b"}"#,
        "\n",
        r#"{"prompt": "c", "answer": "d"}"#,
        "\n"
    );
    let file = data_file("missing.jsonl", data);
    let message = load_records(&file.path, None).unwrap_err().to_string();
    assert!(
        message.starts_with(&format!("{}:2:", file.path.display())),
        "{message}"
    );
    assert!(message.contains("\"completion\""), "{message}");
    assert!(message.contains("prompt_completion"), "{message}");

    let array =
        r#"[{"messages": [{"role": "user", "content": "hi"}]}, {"messages": [{"role": "user"}]}]"#;
    let message = parse_records(array, "chat.json", None)
        .unwrap_err()
        .to_string();
    assert!(message.starts_with("chat.json record 2:"), "{message}");
    assert!(message.contains("\"content\""), "{message}");
    assert!(message.contains("\"role\""), "{message}");

    let alpaca = r#"{"instruction": "x", "output": 3}"#;
    let message = parse_records(alpaca, "a.jsonl", None)
        .unwrap_err()
        .to_string();
    assert!(message.starts_with("a.jsonl:1:"), "{message}");
    assert!(message.contains("\"output\" is a number"), "{message}");
}

#[test]
fn other_bad_records_are_explained() {
    let unknown = r#"{"question": "x", "answer": "y"}"#;
    let error = parse_records(unknown, "q.jsonl", None).unwrap_err();
    assert!(
        matches!(error, DataError::UnknownFormat { .. }),
        "{error:?}"
    );
    let message = error.to_string();
    assert!(
        message.contains("\"question\"") && message.contains("--format"),
        "{message}"
    );

    let role = r#"{"messages": [{"role": "tool", "content": "x"}]}"#;
    let message = parse_records(role, "r.jsonl", None)
        .unwrap_err()
        .to_string();
    assert!(
        message.starts_with("r.jsonl:1:") && message.contains("\"tool\""),
        "{message}"
    );

    let from = r#"{"conversations": [{"from": "bot", "value": "x"}]}"#;
    let message = parse_records(from, "s.jsonl", None)
        .unwrap_err()
        .to_string();
    assert!(message.contains("\"bot\""), "{message}");

    let not_object = "[1, 2]";
    let message = parse_records(not_object, "n.json", None)
        .unwrap_err()
        .to_string();
    assert!(
        message.starts_with("n.json record 1:") && message.contains("a number"),
        "{message}"
    );

    let empty_turns = r#"{"messages": []}"#;
    let message = parse_records(empty_turns, "e.jsonl", None)
        .unwrap_err()
        .to_string();
    assert!(message.contains("empty list"), "{message}");

    let missing = load_records(Path::new("/no/such/dir/data.jsonl"), None).unwrap_err();
    assert!(matches!(missing, DataError::Read { .. }), "{missing:?}");
}

#[test]
fn empty_dataset_is_an_error() {
    for contents in ["", "\n  \n\n", "[]", " [ ] "] {
        let file = data_file("empty.jsonl", contents);
        let error = load_records(&file.path, None).unwrap_err();
        assert!(
            matches!(error, DataError::Empty { .. }),
            "{contents:?}: {error:?}"
        );
        let message = error.to_string();
        assert!(message.contains("empty"), "{message}");
        assert!(
            message.contains(&file.path.display().to_string()),
            "{message}"
        );
    }
    let error = tokenize_records(&[], &tokenizer(), &template(), &options(64)).unwrap_err();
    assert!(matches!(error, DataError::Empty { .. }), "{error:?}");
}

#[test]
fn toy_datasets_load_and_differ() {
    let tok = tokenizer();
    let opts = options(256);
    let train = load_dataset(Path::new(TOY_DATASET), &tok, &template(), &opts).unwrap();
    let eval = load_dataset(Path::new(TOY_EVAL), &tok, &template(), &opts).unwrap();
    assert!(train.examples.len() >= 250, "{}", train.stats);
    assert!(eval.examples.len() >= 25, "{}", eval.stats);
    assert_eq!(train.stats.skipped_no_loss + eval.stats.skipped_no_loss, 0);
    assert_eq!(train.stats.truncated + eval.stats.truncated, 0);
    // Every reply is "The <animal> says <sound>.<|end|>".
    for example in train.examples.iter().chain(&eval.examples) {
        for run in labelled_runs(example, &tok) {
            assert!(
                run.starts_with("The ") && run.contains(" says ") && run.ends_with(".<|end|>"),
                "{run}"
            );
        }
    }
    // No eval conversation appears in the training data.
    let train_ids: std::collections::HashSet<&Vec<u32>> =
        train.examples.iter().map(|e| &e.input_ids).collect();
    assert!(eval
        .examples
        .iter()
        .all(|e| !train_ids.contains(&e.input_ids)));
}

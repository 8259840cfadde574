mod common;

use std::collections::HashMap;

use ytrainer_data::{
    BatchOptions, ChatTemplate, DataOptions, Example, Message, Mode, Origin, Overlong, Record,
    RecordKind, TokenizerWrapper, TrainOn, load_records, plan_epoch, prepare,
};

fn origin(i: usize) -> Origin {
    Origin {
        file: "t.jsonl".into(),
        line: i + 1,
        index: i,
    }
}

/// Synthetic examples: lengths 3..=40, targets on the second half, ids encode (example, position).
fn synthetic(n: usize) -> Vec<Example> {
    (0..n)
        .map(|i| {
            let len = 3 + (i * 7) % 38;
            let ids = (0..len as u32).map(|t| 1000 * i as u32 + t + 1).collect();
            let targets = (0..len).map(|t| t >= len / 2).collect();
            Example::single(ids, targets, Some(origin(i)))
        })
        .collect()
}

fn opts() -> BatchOptions {
    BatchOptions {
        seed: 7,
        shuffle: true,
        micro_batch_tokens: 128,
        max_micro_batch_size: 4,
        tokens_per_step: 50,
        micro_batches_per_step: 0,
        mode: Mode::OnePass,
        pad_id: 99_999,
    }
}

#[test]
fn one_pass_conserves_tokens_and_is_deterministic() {
    let ex = synthetic(57);
    let total: usize = ex.iter().map(Example::num_targets).sum();
    let o = opts();
    let plan = plan_epoch(&ex, &o, 0).unwrap();
    assert_eq!(
        plan,
        plan_epoch(&ex, &o, 0).unwrap(),
        "same seed and epoch, same plan"
    );
    assert_ne!(plan, plan_epoch(&ex, &o, 1).unwrap(), "epochs reshuffle");
    assert_ne!(
        plan,
        plan_epoch(
            &ex,
            &BatchOptions {
                seed: 8,
                ..o.clone()
            },
            0
        )
        .unwrap()
    );
    let mut seen = vec![0; ex.len()];
    let mut planned = 0;
    for (s, step) in plan.iter().enumerate() {
        let st = step.num_targets();
        if s + 1 < plan.len() {
            assert!(st >= o.tokens_per_step);
            // A step closes as soon as it reaches the budget.
            let without_last = st - step.micro_batches.last().unwrap().num_targets();
            assert!(without_last < o.tokens_per_step);
        }
        for mb in &step.micro_batches {
            assert!(mb.batch <= o.max_micro_batch_size);
            assert!(mb.batch * mb.seq <= o.micro_batch_tokens || mb.batch == 1);
            assert_eq!(mb.input_ids.len(), mb.batch * mb.seq);
            for (r, &i) in mb.examples.iter().enumerate() {
                seen[i] += 1;
                let e = &ex[i];
                let row = r * mb.seq..(r + 1) * mb.seq;
                let n = e.len();
                assert_eq!(&mb.input_ids[row.start..row.start + n], &e.input_ids[..]);
                assert_eq!(&mb.target_mask[row.start..row.start + n], &e.targets[..]);
                assert_eq!(
                    &mb.position_ids[row.start..row.start + n],
                    &e.position_ids[..]
                );
                assert!(
                    mb.input_ids[row.start + n..row.end]
                        .iter()
                        .all(|&x| x == o.pad_id)
                );
                assert!(
                    mb.segment_ids[row.start + n..row.end]
                        .iter()
                        .all(|&x| x == 0)
                );
                assert!(!mb.target_mask[row.start + n..row.end].iter().any(|&x| x));
                assert!(!mb.target_mask[row.start]);
            }
            planned += mb.num_targets();
        }
    }
    assert_eq!(
        seen,
        vec![1; ex.len()],
        "every example exactly once per epoch"
    );
    assert_eq!(planned, total);
    // Bucketing keeps padding small: under a quarter of the padded area.
    let area: usize = plan
        .iter()
        .flat_map(|s| &s.micro_batches)
        .map(|m| m.batch * m.seq)
        .sum();
    let real: usize = ex.iter().map(Example::len).sum();
    assert!(area * 3 < real * 4, "area {area} real {real}");
}

#[test]
fn one_pass_without_shuffle_keeps_dataset_order() {
    let ex = synthetic(10);
    let o = BatchOptions {
        shuffle: false,
        ..opts()
    };
    let plan = plan_epoch(&ex, &o, 3).unwrap();
    let order: Vec<usize> = plan
        .iter()
        .flat_map(|s| &s.micro_batches)
        .flat_map(|m| m.examples.clone())
        .collect();
    assert_eq!(order, (0..10).collect::<Vec<_>>());
}

#[test]
fn windowed_trains_every_target_exactly_once_and_keeps_the_tail() {
    let ex = synthetic(9);
    for n in [1usize, 3, 10, 1000] {
        let o = BatchOptions {
            mode: Mode::Windowed { token_batch: n },
            ..opts()
        };
        let plan = plan_epoch(&ex, &o, 2).unwrap();
        assert_eq!(plan, plan_epoch(&ex, &o, 2).unwrap());
        let mut hits: HashMap<(usize, usize), usize> = HashMap::new();
        let mut per_example: HashMap<usize, Vec<usize>> = HashMap::new();
        for step in &plan {
            assert_eq!(step.micro_batches.len(), 1);
            let mb = &step.micro_batches[0];
            assert_eq!((mb.batch, mb.examples.len()), (1, 1));
            let i = mb.examples[0];
            let e = &ex[i];
            // The row is the example's prefix up to the window's last target.
            assert_eq!(&mb.input_ids[..], &e.input_ids[..mb.seq]);
            assert!(*mb.target_mask.last().unwrap());
            let k = mb.num_targets();
            assert!(k >= 1 && k <= n);
            per_example.entry(i).or_default().push(k);
            for (t, &m) in mb.target_mask.iter().enumerate() {
                if m {
                    assert!(e.targets[t]);
                    *hits.entry((i, t)).or_default() += 1;
                }
            }
        }
        for (i, e) in ex.iter().enumerate() {
            for t in 0..e.len() {
                assert_eq!(
                    hits.get(&(i, t)).copied().unwrap_or(0),
                    usize::from(e.targets[t]),
                    "n={n} ex={i} t={t}"
                );
            }
            // Consecutive windows: full windows of n, then the tail.
            let ks = &per_example[&i];
            let total = e.num_targets();
            let mut expected = vec![n; total / n];
            if total % n != 0 {
                expected.push(total % n);
            }
            assert_eq!(ks, &expected);
        }
    }
}

/// Gradient accumulation by count: every step holds exactly `micro_batches_per_step` micro-batches (the last step
/// of the epoch the rest), each of at most `max_micro_batch_size` rows; every example is trained once; windowed
/// mode refuses it.
#[test]
fn micro_batches_per_step_makes_steps_of_that_many_micro_batches() {
    let ex = synthetic(50);
    let o = BatchOptions {
        micro_batch_tokens: usize::MAX,
        max_micro_batch_size: 4,
        micro_batches_per_step: 3,
        ..opts()
    };
    let steps = plan_epoch(&ex, &o, 0).unwrap();
    // 50 examples in micro-batches of 4 rows: 13 micro-batches, steps of 3: 5 steps (the last holds 1).
    let sizes: Vec<usize> = steps.iter().map(|s| s.micro_batches.len()).collect();
    assert_eq!(sizes, [3, 3, 3, 3, 1]);
    let rows: Vec<usize> = steps
        .iter()
        .flat_map(|s| s.micro_batches.iter().map(|m| m.batch))
        .collect();
    assert_eq!(rows.iter().filter(|&&r| r == 4).count(), 12);
    assert_eq!(rows.iter().sum::<usize>(), 50);
    let mut seen: Vec<usize> = steps
        .iter()
        .flat_map(|s| s.micro_batches.iter().flat_map(|m| m.examples.clone()))
        .collect();
    seen.sort();
    assert_eq!(seen, (0..50).collect::<Vec<_>>());
    let windowed = BatchOptions {
        mode: Mode::Windowed { token_batch: 4 },
        ..o
    };
    assert!(
        plan_epoch(&ex, &windowed, 0)
            .unwrap_err()
            .to_string()
            .contains("grad_accum / batch_size apply to one-pass mode")
    );
}

#[test]
fn windowed_zero_is_an_error() {
    let o = BatchOptions {
        mode: Mode::Windowed { token_batch: 0 },
        ..opts()
    };
    assert_eq!(
        plan_epoch(&synthetic(2), &o, 0).unwrap_err().to_string(),
        "invalid option: token_batch = 0: windowed mode needs at least 1 target token per window (the seed crashed here); use token_batch >= 1 or mode = \"one-pass\""
    );
}

fn tiny(a: &std::path::Path) -> (TokenizerWrapper, ChatTemplate) {
    (
        TokenizerWrapper::from_file(&a.join("tiny-qwen2/tokenizer.json")).unwrap(),
        ChatTemplate::from_model_dir(&a.join("tiny-qwen2")).unwrap(),
    )
}

#[test]
fn prepare_chat_counts_truncation_skips_and_targets() {
    let a = assets_or_skip!();
    let (tok, t) = tiny(&a);
    let l = load_records(&a.join("corpora/instruct/identity.json")).unwrap();
    let base = DataOptions {
        max_seq_len: 4096,
        ..Default::default()
    };
    let full = prepare(&l.records, &tok, Some(&t), &base).unwrap();
    assert_eq!(full.stats.records, l.records.len());
    assert_eq!(full.stats.examples, l.records.len());
    assert_eq!(
        (
            full.stats.truncated,
            full.stats.skipped_overlong,
            full.stats.skipped_no_targets
        ),
        (0, 0, 0)
    );
    let sup: usize = full.examples.iter().map(Example::num_targets).sum();
    assert_eq!(full.stats.supervised_tokens, sup);
    assert_eq!(full.examples[0].origin.as_ref().unwrap().line, 2);
    let lens: Vec<usize> = full.examples.iter().map(Example::len).collect();
    // Cut just after the first example's prompt: its answer is partly kept, most others lose theirs.
    let cut = full.examples[0].targets.iter().position(|&x| x).unwrap() + 3;
    let tr = prepare(
        &l.records,
        &tok,
        Some(&t),
        &DataOptions {
            max_seq_len: cut,
            ..base.clone()
        },
    )
    .unwrap();
    let over = lens.iter().filter(|&&n| n > cut).count();
    assert!(over > 0);
    assert_eq!(tr.stats.truncated, over);
    assert_eq!(
        tr.stats.examples + tr.stats.skipped_no_targets,
        l.records.len()
    );
    assert!(
        tr.examples
            .iter()
            .all(|e| e.len() <= cut && e.num_targets() > 0)
    );
    let sk = prepare(
        &l.records,
        &tok,
        Some(&t),
        &DataOptions {
            max_seq_len: cut,
            overlong: Overlong::Skip,
            ..base.clone()
        },
    )
    .unwrap_err()
    .to_string();
    let expected = format!(
        "<prepared data>: no example is left to train on ({} records: {} too long and skipped, 0 without any supervised token); raise max_seq_len, use overlong = truncate, or check the train_on setting",
        l.records.len(),
        l.records.len()
    );
    if over == l.records.len() {
        assert_eq!(sk, expected);
    }
    let sk = prepare(
        &l.records,
        &tok,
        Some(&t),
        &DataOptions {
            max_seq_len: 60,
            overlong: Overlong::Skip,
            ..base.clone()
        },
    )
    .unwrap();
    assert_eq!(
        sk.stats.skipped_overlong,
        lens.iter().filter(|&&n| n > 60).count()
    );
    assert_eq!(sk.stats.examples, lens.iter().filter(|&&n| n <= 60).count());

    // Chat records without a template.
    let e = prepare(&l.records, &tok, None, &base)
        .unwrap_err()
        .to_string();
    assert!(e.ends_with(":2: this is a chat record but no chat template is available; give the model's template (or use text records for continued pretraining)"), "{e}");
}

#[test]
fn prepare_prefix_mismatch_names_the_record() {
    let a = assets_or_skip!();
    let (tok, _) = tiny(&a);
    let t = ChatTemplate::new(
        "{% for m in messages %}{% if m.role != 'assistant' or loop.last %}{{ m.content }}|{% endif %}{% endfor %}{% if add_generation_prompt %}>{% endif %}",
        None,
        None,
    )
    .unwrap();
    let rec = Record {
        origin: origin(16),
        kind: RecordKind::Chat {
            messages: vec![
                Message::new("user", "a"),
                Message::new("assistant", "b"),
                Message::new("user", "c"),
                Message::new("assistant", "d"),
            ],
        },
        weights: Default::default(),
    };
    let e = prepare(&[rec], &tok, Some(&t), &DataOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("t.jsonl:17: the chat template renders turn 1 differently"),
        "{e}"
    );
}

#[test]
fn cpt_packs_documents_without_crossing_segments() {
    let a = assets_or_skip!();
    let (tok, _) = tiny(&a);
    let docs = [
        "one two three four five six seven",
        "alpha beta",
        "x",
        "The quick brown fox jumps over the lazy dog again and again.",
    ];
    let records: Vec<Record> = docs
        .iter()
        .enumerate()
        .map(|(i, d)| Record {
            origin: origin(i),
            kind: RecordKind::Text {
                text: d.to_string(),
            },
            weights: Default::default(),
        })
        .collect();
    let eos = tok.eos_id().unwrap();
    let stream: Vec<u32> = docs
        .iter()
        .flat_map(|d| tok.encode(d).unwrap().into_iter().chain([eos]))
        .collect();
    let row = 8;
    let p = prepare(
        &records,
        &tok,
        None,
        &DataOptions {
            max_seq_len: row,
            cpt: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(p.stats.documents, 4);
    // Rows are exactly `row` long except the last; their concatenation is the document stream.
    // (A last row holding a single token has nothing to supervise and is dropped.)
    let n = p.examples.len();
    let dropped_tail = usize::from(stream.len() % row == 1);
    assert_eq!(
        n,
        stream.len().div_ceil(row) - dropped_tail,
        "stream of {}",
        stream.len()
    );
    let stream = &stream[..stream.len() - dropped_tail];
    for (i, e) in p.examples.iter().enumerate() {
        if i + 1 < n {
            assert_eq!(e.len(), row);
        }
    }
    let cat: Vec<u32> = p
        .examples
        .iter()
        .flat_map(|e| e.input_ids.clone())
        .collect();
    assert_eq!(cat, stream);
    // Within a row: a target's predecessor is in the same segment; segments restart positions.
    let mut chunks = 0;
    for e in &p.examples {
        assert_eq!(e.segment_ids[0], 1);
        for t in 0..e.len() {
            let new_seg = t == 0 || e.segment_ids[t] != e.segment_ids[t - 1];
            if new_seg {
                chunks += 1;
                assert_eq!(e.position_ids[t], 0);
                assert!(!e.targets[t]);
                if t > 0 {
                    assert_eq!(e.segment_ids[t], e.segment_ids[t - 1] + 1);
                }
            } else {
                assert_eq!(e.position_ids[t], e.position_ids[t - 1] + 1);
                assert!(e.targets[t]);
            }
        }
    }
    assert_eq!(p.stats.supervised_tokens, stream.len() - chunks);
    // Segment ends: an EOS closes each document.
    let ends: usize = p
        .examples
        .iter()
        .flat_map(|e| &e.input_ids)
        .filter(|&&x| x == eos)
        .count();
    assert_eq!(ends, 4 - dropped_tail);
    // Batching keeps segment ids, so packed rows stay separated downstream.
    let plan = plan_epoch(
        &p.examples,
        &BatchOptions {
            micro_batch_tokens: 32,
            ..opts()
        },
        0,
    )
    .unwrap();
    let planned: usize = plan.iter().map(|s| s.num_targets()).sum();
    assert_eq!(planned, p.stats.supervised_tokens);
}

#[test]
fn prepare_then_plan_on_real_data_conserves_supervised_tokens() {
    let a = assets_or_skip!();
    let (tok, t) = tiny(&a);
    let l = load_records(&a.join("corpora/instruct/v1_sft_demo.jsonl")).unwrap();
    let recs = &l.records[..120];
    let p = prepare(
        recs,
        &tok,
        Some(&t),
        &DataOptions {
            max_seq_len: 256,
            train_on: TrainOn::AllAssistant,
            ..Default::default()
        },
    )
    .unwrap();
    for mode in [Mode::OnePass, Mode::Windowed { token_batch: 16 }] {
        let o = BatchOptions {
            micro_batch_tokens: 1024,
            max_micro_batch_size: 8,
            tokens_per_step: 512,
            mode,
            pad_id: 8189,
            ..opts()
        };
        let plan = plan_epoch(&p.examples, &o, 0).unwrap();
        let planned: usize = plan.iter().map(|s| s.num_targets()).sum();
        assert_eq!(planned, p.stats.supervised_tokens, "{mode:?}");
    }
}

/// Data weights: a record's `weight` and each message's `"weight"` (messages and ShareGPT spellings) reach the
/// prepared example's per-token weights; a message of weight 0 leaves the supervision mask; bad weights are
/// errors naming the file, line and field.
#[test]
fn record_and_message_weights_reach_the_tokens_and_zero_drops_the_turn() {
    use ytrainer_data::{parse_records, render_chat_spans};
    let a = assets_or_skip!();
    let (tok, t) = tiny(&a);
    let text = concat!(
        r#"{"weight": 2.0, "system": "S", "messages": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "let me think", "weight": 0.25}, {"role": "user", "content": "q2"}, {"role": "assistant", "content": "the answer"}]}"#,
        "\n",
        r#"{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "skip me", "weight": 0}, {"from": "human", "value": "q3"}, {"from": "gpt", "value": "keep"}]}"#,
        "\n",
        r#"{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}"#,
        "\n"
    );
    let path = std::path::Path::new("w.jsonl");
    let l = parse_records(path, text).unwrap();
    assert_eq!(l.records[0].weights.record(), 2.0);
    // The system field opens the message list, so it takes index 0.
    assert_eq!(
        l.records[0].weights.messages.0,
        vec![1.0, 1.0, 0.25, 1.0, 1.0]
    );
    assert_eq!(l.records[1].weights.messages.0, vec![1.0, 0.0, 1.0, 1.0]);
    assert!(l.records[2].weights.is_uniform());

    let opts = DataOptions {
        max_seq_len: 4096,
        ..Default::default()
    };
    let weighted = prepare(&l.records, &tok, Some(&t), &opts).unwrap();
    let mut plain_records = l.records.clone();
    for r in &mut plain_records {
        r.weights = Default::default();
    }
    let plain = prepare(&plain_records, &tok, Some(&t), &opts).unwrap();
    // Tokens of each supervised span, by message.
    let span_tokens = |i: usize| -> Vec<(usize, usize)> {
        let RecordKind::Chat { messages } = &l.records[i].kind else {
            unreachable!()
        };
        let r =
            render_chat_spans(&t, messages, TrainOn::AllAssistant, &Default::default()).unwrap();
        r.spans
            .iter()
            .zip(&r.span_messages)
            .filter(|((_, sup), _)| *sup)
            .map(|((range, _), m)| {
                (
                    m.unwrap(),
                    tok.encode(&r.text[range.clone()]).unwrap().len(),
                )
            })
            .collect()
    };

    // Record 0: same mask as unweighted; "let me think" targets weigh 2 * 0.25, "the answer" targets 2.
    let (w0, p0) = (&weighted.examples[0], &plain.examples[0]);
    assert_eq!(w0.targets, p0.targets);
    let spans = span_tokens(0);
    assert_eq!(spans.iter().map(|s| s.0).collect::<Vec<_>>(), vec![2, 4]);
    let got: Vec<f32> = (0..w0.len())
        .filter(|&i| w0.targets[i])
        .map(|i| w0.weights.get(i))
        .collect();
    let want: Vec<f32> = std::iter::repeat_n(0.5, spans[0].1)
        .chain(std::iter::repeat_n(2.0, spans[1].1))
        .collect();
    assert_eq!(got, want);

    // Record 1: the weight-0 turn is not supervised; the rest keeps weight 1 (so no weights are stored).
    let (w1, p1) = (&weighted.examples[1], &plain.examples[1]);
    let spans = span_tokens(1);
    assert_eq!(spans[0].0, 1);
    assert_eq!(w1.num_targets(), p1.num_targets() - spans[0].1);
    assert!(w1.weights.is_uniform());
    assert_eq!(
        weighted.stats.supervised_tokens,
        plain.stats.supervised_tokens - spans[0].1
    );

    // The micro-batch carries the weights at the target positions.
    let plan = plan_epoch(&weighted.examples, &BatchOptions::default(), 0).unwrap();
    let mb = plan
        .iter()
        .flat_map(|s| &s.micro_batches)
        .find(|mb| mb.examples.contains(&0))
        .unwrap();
    let row = mb.examples.iter().position(|&e| e == 0).unwrap();
    let w: Vec<f32> = (0..mb.seq)
        .filter(|&j| mb.target_mask[row * mb.seq + j])
        .map(|j| mb.weights.get(row * mb.seq + j))
        .collect();
    assert_eq!(w, want);

    // Bad weights name the file, line and field.
    let err = |text: &str| parse_records(path, text).unwrap_err().to_string();
    assert_eq!(
        err(
            r#"{"weight": -1, "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}"#
        ),
        "w.jsonl:1: field \"weight\" = -1: a weight must be a finite number >= 0 (1 = normal, 0 = not trained); fix or remove it"
    );
    assert_eq!(
        err(
            r#"{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": "high"}]}"#
        ),
        "w.jsonl:1: field \"messages[1].weight\" = \"high\": a weight must be a finite number >= 0 (1 = normal, 0 = not trained); fix or remove it"
    );
    // Continued pretraining packs documents into shared rows: a per-document weight is refused.
    let docs = parse_records(path, "{\"text\": \"one two\", \"weight\": 3}\n").unwrap();
    let e = prepare(
        &docs.records,
        &tok,
        None,
        &DataOptions {
            cpt: true,
            ..opts.clone()
        },
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.starts_with(
            "w.jsonl:1: field \"weight\" = 3: continued-pretraining documents are packed"
        ),
        "{e}"
    );
}

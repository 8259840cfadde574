//! Records one at a time, for tools that must not hold a whole corpus in memory (`ytrainer sort`).
//!
//! JSON Lines and JSON arrays are read incrementally (memory bounded by the largest record); CSV files are
//! read whole (their quoting makes record borders depend on the whole file). Plain-text files (`.txt`, `.md`)
//! are continued-pretraining paragraphs, not records, and are refused. The layout is detected from the first
//! record exactly as [`crate::load_records`] does, and each item keeps its raw JSON object unchanged.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::error::DataError;
use crate::formats::{Format, Origin, Raw, Record, convert, detect, load_objects};

/// One record of the stream.
#[derive(Debug, Clone)]
pub struct StreamItem {
    pub origin: Origin,
    /// The record as it is in the file.
    pub object: Map<String, Value>,
    /// The parsed record, or why it is dropped (an empty answer, no assistant turn), as `load_records` warns.
    pub record: Result<Record, String>,
    /// Bytes of the file consumed so far (for progress).
    pub bytes_read: u64,
}

enum Inner {
    Lines(BufReader<File>),
    Array { reader: BufReader<File>, done: bool },
    Buffered(std::vec::IntoIter<Raw>),
}

/// Iterator over a data file's records; see the module docs.
pub struct RecordStream {
    path: PathBuf,
    inner: Inner,
    format: Option<Format>,
    index: usize,
    line: usize,
    bytes: u64,
    total: u64,
    failed: bool,
}

const ARRAY_HINT: &str = "the file must be a JSON array of objects";

impl RecordStream {
    /// Opens `path` (json, jsonl or csv).
    pub fn open(path: &Path) -> Result<Self, DataError> {
        let io = |source| DataError::Io {
            path: path.to_path_buf(),
            source,
        };
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .map(|e| e.to_ascii_lowercase())
            .unwrap_or_default();
        if matches!(ext.as_str(), "txt" | "md" | "text") {
            return Err(DataError::InvalidOption(format!(
                "{}: plain-text files hold continued-pretraining paragraphs, not records; give a json, jsonl or \
                 csv file of SFT records (messages, alpaca, prompt/completion, question/answer or text)",
                path.display()
            )));
        }
        let file = File::open(path).map_err(io)?;
        let total = file.metadata().map(|m| m.len()).unwrap_or(0);
        let mut stream = RecordStream {
            path: path.to_path_buf(),
            inner: Inner::Lines(BufReader::with_capacity(1 << 16, file)),
            format: None,
            index: 0,
            line: 1,
            bytes: 0,
            total,
            failed: false,
        };
        if ext == "csv" {
            stream.inner = Inner::Buffered(load_objects(path)?.into_iter());
            stream.bytes = total;
            return Ok(stream);
        }
        // A JSON array when the first non-blank character (after a BOM) is `[`.
        let Inner::Lines(reader) = &mut stream.inner else {
            unreachable!()
        };
        loop {
            let buf = reader.fill_buf().map_err(io)?;
            if buf.is_empty() {
                break;
            }
            let mut skip = 0;
            if stream.bytes == 0 && buf.starts_with("\u{feff}".as_bytes()) {
                skip = 3;
            }
            while skip < buf.len() && buf[skip].is_ascii_whitespace() {
                if buf[skip] == b'\n' {
                    stream.line += 1;
                }
                skip += 1;
            }
            let first = buf.get(skip).copied();
            reader.consume(skip);
            stream.bytes += skip as u64;
            match first {
                None => continue,
                Some(b'[') => {
                    reader.consume(1);
                    stream.bytes += 1;
                    let Inner::Lines(r) =
                        std::mem::replace(&mut stream.inner, Inner::Buffered(vec![].into_iter()))
                    else {
                        unreachable!()
                    };
                    stream.inner = Inner::Array {
                        reader: r,
                        done: false,
                    };
                }
                Some(_) => {}
            }
            break;
        }
        Ok(stream)
    }

    /// Size of the file in bytes.
    pub fn total_bytes(&self) -> u64 {
        self.total
    }

    /// The layout, once the first record is read.
    pub fn format(&self) -> Option<Format> {
        self.format
    }

    fn json_err(&self, line: usize, message: String, hint: &str) -> DataError {
        DataError::Json {
            file: self.path.clone(),
            line,
            message,
            hint: hint.to_string(),
        }
    }

    fn object(&self, line: usize, v: Value, hint: &str) -> Result<Map<String, Value>, DataError> {
        match v {
            Value::Object(m) => Ok(m),
            _ => Err(self.json_err(
                line,
                "expected a JSON object".into(),
                &format!("{hint}; every record must be an object such as {{\"messages\": [...]}}"),
            )),
        }
    }

    /// The next raw object and its start line, or `None` at the end.
    fn next_raw(&mut self) -> Result<Option<Raw>, DataError> {
        let io = |path: &Path, source| DataError::Io {
            path: path.to_path_buf(),
            source,
        };
        match &mut self.inner {
            Inner::Buffered(it) => Ok(it.next()),
            Inner::Lines(reader) => loop {
                let mut buf = Vec::new();
                let n = reader
                    .read_until(b'\n', &mut buf)
                    .map_err(|e| io(&self.path, e))?;
                if n == 0 {
                    return Ok(None);
                }
                self.bytes += n as u64;
                let line = self.line;
                self.line += 1;
                let text = std::str::from_utf8(&buf).map_err(|e| DataError::NotUtf8 {
                    file: self.path.clone(),
                    line,
                    offset: (self.bytes - n as u64) as usize + e.valid_up_to(),
                })?;
                if text.trim().is_empty() {
                    continue;
                }
                let v: Value = serde_json::from_str(text).map_err(|e| {
                    let msg = e.to_string();
                    let msg = msg.rfind(" at line ").map(|i| msg[..i].to_string()).unwrap_or(msg);
                    self.json_err(
                        line,
                        msg,
                        "each line of a JSON Lines file must be one complete JSON object (fix or delete the line)",
                    )
                })?;
                return Ok(Some((line, self.object(line, v, "JSON Lines")?)));
            },
            Inner::Array { reader, done } => {
                if *done {
                    return Ok(None);
                }
                // Skip blanks and the separating comma; then read one value by bracket depth.
                let mut bytes = Vec::new();
                let (mut depth, mut in_str, mut esc) = (0i64, false, false);
                let mut start_line = self.line;
                let mut started = false;
                loop {
                    let mut b = [0u8; 1];
                    let got = reader.read(&mut b).map_err(|e| io(&self.path, e))?;
                    if got == 0 {
                        let line = self.line;
                        return Err(self.json_err(
                            line,
                            "the array is not closed (missing `]`) or a record is cut off".into(),
                            ARRAY_HINT,
                        ));
                    }
                    self.bytes += 1;
                    let c = b[0];
                    if c == b'\n' {
                        self.line += 1;
                    }
                    if !started {
                        if c.is_ascii_whitespace() || (c == b',' && self.index > 0) {
                            continue;
                        }
                        if c == b']' {
                            *done = true;
                            return Ok(None);
                        }
                        if c != b'{' {
                            let line = self.line;
                            return Err(self.json_err(
                                line,
                                format!("expected a JSON object, found `{}`", c as char),
                                "every record must be an object such as {\"messages\": [...]}",
                            ));
                        }
                        started = true;
                        start_line = self.line;
                    }
                    if in_str {
                        if esc {
                            esc = false;
                        } else if c == b'\\' {
                            esc = true;
                        } else if c == b'"' {
                            in_str = false;
                        }
                    } else {
                        match c {
                            b'"' => in_str = true,
                            b'{' | b'[' => depth += 1,
                            b'}' | b']' => depth -= 1,
                            _ => {}
                        }
                    }
                    bytes.push(c);
                    if depth == 0 {
                        break;
                    }
                }
                let v: Value = serde_json::from_slice(&bytes).map_err(|e| {
                    let msg = e.to_string();
                    let msg = msg
                        .rfind(" at line ")
                        .map(|i| msg[..i].to_string())
                        .unwrap_or(msg);
                    self.json_err(start_line + e.line().saturating_sub(1), msg, ARRAY_HINT)
                })?;
                Ok(Some((start_line, self.object(start_line, v, ARRAY_HINT)?)))
            }
        }
    }
}

impl Iterator for RecordStream {
    type Item = Result<StreamItem, DataError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        let item = (|| {
            let Some(raw) = self.next_raw()? else {
                if self.index == 0 {
                    return Err(DataError::EmptyDataset {
                        file: self.path.clone(),
                        message: "the file holds no records; add at least one record".into(),
                    });
                }
                return Ok(None);
            };
            let format = match self.format {
                Some(f) => f,
                None => {
                    let f = detect(&self.path, &raw)?;
                    self.format = Some(f);
                    f
                }
            };
            let origin = Origin {
                file: self.path.clone(),
                line: raw.0,
                index: self.index,
            };
            self.index += 1;
            let record = convert(format, &origin, &raw.1)?.map(|kind| Record {
                origin: origin.clone(),
                kind,
                weights: Default::default(),
            });
            Ok(Some(StreamItem {
                origin,
                object: raw.1,
                record,
                bytes_read: self.bytes,
            }))
        })();
        match item {
            Ok(Some(i)) => Some(Ok(i)),
            Ok(None) => None,
            Err(e) => {
                self.failed = true;
                Some(Err(e))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::load_records;

    fn tmp(name: &str, text: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ytrainer-stream-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    fn same_as_load_records(p: &Path) {
        let items: Vec<StreamItem> = RecordStream::open(p).unwrap().map(|r| r.unwrap()).collect();
        let loaded = load_records(p).unwrap();
        let kept: Vec<Record> = items.iter().filter_map(|i| i.record.clone().ok()).collect();
        assert_eq!(kept, loaded.records);
        assert_eq!(
            items.iter().filter(|i| i.record.is_err()).count(),
            loaded.warnings.len()
        );
    }

    #[test]
    fn json_array_and_lines_match_load_records() {
        let arr = tmp(
            "a.json",
            "\u{feff}  [\n {\"instruction\": \"a [x] {y}\", \"input\": \"\\\"q\\\\\", \"output\": \"b, c]\"},\n\n  {\"instruction\": \"d\", \"output\": \"\"},\n{\"instruction\": \"e\", \"output\": \"f\", \"n\": [1, {\"k\": 2}]}\n]\n",
        );
        same_as_load_records(&arr);
        let items: Vec<StreamItem> = RecordStream::open(&arr)
            .unwrap()
            .map(|r| r.unwrap())
            .collect();
        assert_eq!(items.len(), 3);
        assert_eq!(items[0].origin.line, 2);
        assert_eq!(items[2].origin.line, 5);
        assert_eq!(items[2].object["n"], serde_json::json!([1, {"k": 2}]));
        assert_eq!(
            items[2].bytes_read,
            std::fs::metadata(&arr).unwrap().len() - 3
        );
        let lines = tmp(
            "b.jsonl",
            "{\"prompt\": \"p\", \"completion\": \"c\"}\n\n{\"prompt\": \"q\", \"completion\": \"\"}\n{\"prompt\": \"r\", \"completion\": \"s\"}",
        );
        same_as_load_records(&lines);
        let csv = tmp("c.csv", "question,answer\n\"a, b\",c\nd,e\n");
        same_as_load_records(&csv);
    }

    #[test]
    fn errors_not_panics() {
        let bad = tmp(
            "bad.jsonl",
            "{\"prompt\": \"p\", \"completion\": \"c\"}\n{oops\n",
        );
        let r: Vec<_> = RecordStream::open(&bad).unwrap().collect();
        assert_eq!(r.len(), 2);
        assert!(r[1].as_ref().unwrap_err().to_string().contains(":2:"));
        let open = tmp("open.json", "[{\"prompt\": \"p\", \"completion\": \"c\"}");
        let r: Vec<_> = RecordStream::open(&open).unwrap().collect();
        assert!(
            r[1].as_ref()
                .unwrap_err()
                .to_string()
                .contains("not closed")
        );
        let empty = tmp("empty.json", "[ ]");
        let r: Vec<_> = RecordStream::open(&empty).unwrap().collect();
        assert!(
            r[0].as_ref()
                .unwrap_err()
                .to_string()
                .contains("no records")
        );
        assert!(RecordStream::open(&tmp("x.txt", "hello")).is_err());
        let unknown = tmp("u.jsonl", "{\"foo\": 1}\n");
        let r: Vec<_> = RecordStream::open(&unknown).unwrap().collect();
        assert!(
            r[0].as_ref()
                .unwrap_err()
                .to_string()
                .contains("unknown record format")
        );
    }
}

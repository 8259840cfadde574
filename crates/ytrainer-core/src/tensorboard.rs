//! TensorBoard event files, self-contained: TFRecord framing with masked CRC32C, and the few fields of the
//! `Event` / `Summary` protobufs a scalar needs, encoded by hand (no protobuf dependency).
//!
//! A file is a sequence of records: `u64 length (LE) | u32 masked_crc32c(length bytes) | data |
//! u32 masked_crc32c(data)`. The first record is an `Event { wall_time, file_version: "brain.Event:2" }`; every
//! scalar is an `Event { wall_time, step, summary: Summary { value { tag, simple_value } } }`.
//! [`read_scalars`] parses such a file back (checking every CRC); the tests and `ytrainer plot` use it.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// CRC32C (Castagnoli, reflected polynomial 0x82F63B78).
pub fn crc32c(data: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, e) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    (c >> 1) ^ 0x82F6_3B78
                } else {
                    c >> 1
                };
            }
            *e = c;
        }
        t
    });
    let mut crc = !0u32;
    for &b in data {
        crc = table[((crc ^ b as u32) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

/// TFRecord's masked CRC: `rotr(crc, 15) + 0xa282ead8`.
pub fn masked_crc(data: &[u8]) -> u32 {
    let c = crc32c(data);
    c.rotate_right(15).wrapping_add(0xa282_ead8)
}

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn len_field(field: u32, bytes: &[u8], out: &mut Vec<u8>) {
    varint(((field << 3) | 2) as u64, out);
    varint(bytes.len() as u64, out);
    out.extend_from_slice(bytes);
}

/// Encodes `Event { wall_time = 1, step = 2, file_version = 3 | summary = 5 }`.
fn encode_event(wall_time: f64, step: Option<i64>, body: EventBody<'_>) -> Vec<u8> {
    let mut e = Vec::new();
    e.push(0x09); // field 1, fixed64
    e.extend_from_slice(&wall_time.to_le_bytes());
    if let Some(s) = step {
        e.push(0x10); // field 2, varint
        varint(s as u64, &mut e);
    }
    match body {
        EventBody::FileVersion(v) => len_field(3, v.as_bytes(), &mut e),
        EventBody::Scalars(values) => {
            let mut summary = Vec::new();
            for (tag, value) in values {
                let mut v = Vec::new();
                len_field(1, tag.as_bytes(), &mut v); // Summary.Value.tag
                v.push(0x15); // field 2 (simple_value), fixed32
                v.extend_from_slice(&value.to_le_bytes());
                len_field(1, &v, &mut summary); // Summary.value (repeated)
            }
            len_field(5, &summary, &mut e);
        }
    }
    e
}

enum EventBody<'a> {
    FileVersion(&'a str),
    Scalars(&'a [(String, f32)]),
}

/// Frames one record.
pub fn frame(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc(data).to_le_bytes());
    out
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

fn hostname() -> String {
    let raw = fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| fs::read_to_string("/etc/hostname"))
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .or_else(|| std::env::var("COMPUTERNAME").ok())
        .unwrap_or_default();
    let h: String = raw
        .trim()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        .collect();
    if h.is_empty() {
        "localhost".to_string()
    } else {
        h
    }
}

/// Appends scalar events to `events.out.tfevents.<secs>.<host>` in a run directory.
pub struct EventWriter {
    file: fs::File,
    path: PathBuf,
}

impl EventWriter {
    /// Creates a new event file in `dir` (a resumed run gets a second file; TensorBoard merges them).
    pub fn create(dir: &Path) -> io::Result<Self> {
        let secs = now() as u64;
        let host = hostname();
        let mut n = 0;
        loop {
            let name = if n == 0 {
                format!("events.out.tfevents.{secs}.{host}")
            } else {
                format!("events.out.tfevents.{secs}.{host}.{n}")
            };
            let path = dir.join(name);
            match fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(file) => {
                    let mut w = EventWriter { file, path };
                    w.record(&encode_event(
                        now(),
                        None,
                        EventBody::FileVersion("brain.Event:2"),
                    ))?;
                    return Ok(w);
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && n < 100 => n += 1,
                Err(e) => return Err(e),
            }
        }
    }

    /// The file being written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn record(&mut self, data: &[u8]) -> io::Result<()> {
        self.file.write_all(&frame(data))?;
        self.file.flush()
    }

    /// Writes one event holding `values` at `step`.
    pub fn scalars(&mut self, step: i64, values: &[(String, f32)]) -> io::Result<()> {
        if values.is_empty() {
            return Ok(());
        }
        let e = encode_event(now(), Some(step), EventBody::Scalars(values));
        self.record(&e)
    }

    /// Writes every numeric (and boolean, as 0/1) field of a serialisable record except `step` as a scalar
    /// tagged with the field's name, so the tags are the names of `metrics.jsonl` / `eval.jsonl`.
    pub fn record_fields(&mut self, step: usize, record: &impl serde::Serialize) -> io::Result<()> {
        let Ok(serde_json::Value::Object(map)) = serde_json::to_value(record) else {
            return Ok(());
        };
        let values: Vec<(String, f32)> = map
            .iter()
            .filter(|(k, _)| k.as_str() != "step")
            .filter_map(|(k, v)| {
                let x = match v {
                    serde_json::Value::Number(n) => n.as_f64()?,
                    serde_json::Value::Bool(b) => f64::from(u8::from(*b)),
                    _ => return None,
                };
                Some((k.clone(), x as f32))
            })
            .collect();
        self.scalars(step as i64, &values)
    }
}

/// One scalar read back from an event file.
#[derive(Debug, Clone, PartialEq)]
pub struct Scalar {
    /// Event wall time (seconds since the epoch).
    pub wall_time: f64,
    /// Step.
    pub step: i64,
    /// Tag.
    pub tag: String,
    /// Value.
    pub value: f32,
}

/// What an event file holds: its `file_version` and every scalar, in order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EventFile {
    /// `file_version` of the first event.
    pub file_version: Option<String>,
    /// Number of records.
    pub records: usize,
    /// Every scalar.
    pub scalars: Vec<Scalar>,
}

fn read_varint(b: &[u8], i: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *b.get(*i)?;
        *i += 1;
        v |= ((byte & 0x7f) as u64) << shift;
        if byte < 0x80 {
            return Some(v);
        }
    }
    None
}

/// Iterates `(field, wire type, payload)`; varints and fixed values come back as their raw bytes.
fn fields(b: &[u8]) -> Option<Vec<(u32, u8, &[u8])>> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let key = read_varint(b, &mut i)?;
        let (field, wire) = ((key >> 3) as u32, (key & 7) as u8);
        let start = i;
        let end = match wire {
            0 => {
                read_varint(b, &mut i)?;
                i
            }
            1 => i + 8,
            2 => {
                let n = read_varint(b, &mut i)? as usize;
                let s = i;
                i = s + n;
                out.push((field, wire, b.get(s..i)?));
                continue;
            }
            5 => i + 4,
            _ => return None,
        };
        i = end;
        out.push((field, wire, b.get(start..end)?));
    }
    Some(out)
}

fn bad(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// Parses an event file, checking both CRCs of every record and decoding the scalar summaries.
pub fn read_scalars(path: &Path) -> io::Result<EventFile> {
    let bytes = fs::read(path)?;
    let mut out = EventFile::default();
    let mut i = 0;
    while i < bytes.len() {
        let at = i;
        let header = bytes
            .get(i..i + 12)
            .ok_or_else(|| bad(format!("truncated record header at byte {at}")))?;
        let len_bytes = &header[..8];
        let len = u64::from_le_bytes(len_bytes.try_into().unwrap_or_default()) as usize;
        let len_crc = u32::from_le_bytes(header[8..12].try_into().unwrap_or_default());
        if len_crc != masked_crc(len_bytes) {
            return Err(bad(format!("bad length CRC at byte {at}")));
        }
        let data = bytes
            .get(i + 12..i + 12 + len)
            .ok_or_else(|| bad(format!("truncated record at byte {at}")))?;
        let crc = bytes
            .get(i + 12 + len..i + 16 + len)
            .ok_or_else(|| bad(format!("truncated record CRC at byte {at}")))?;
        if u32::from_le_bytes(crc.try_into().unwrap_or_default()) != masked_crc(data) {
            return Err(bad(format!("bad data CRC at byte {at}")));
        }
        i += 16 + len;
        out.records += 1;
        let f = fields(data).ok_or_else(|| bad(format!("malformed Event at byte {at}")))?;
        let (mut wall_time, mut step) = (0.0, 0i64);
        let mut values = Vec::new();
        for (field, wire, payload) in f {
            match (field, wire) {
                (1, 1) => wall_time = f64::from_le_bytes(payload.try_into().unwrap_or_default()),
                (2, 0) => step = read_varint(payload, &mut 0).unwrap_or(0) as i64,
                (3, 2) => out.file_version = Some(String::from_utf8_lossy(payload).to_string()),
                (5, 2) => {
                    for (vf, vw, v) in fields(payload).unwrap_or_default() {
                        if (vf, vw) != (1, 2) {
                            continue;
                        }
                        let (mut tag, mut value) = (String::new(), None);
                        for (ff, fw, p) in fields(v).unwrap_or_default() {
                            match (ff, fw) {
                                (1, 2) => tag = String::from_utf8_lossy(p).to_string(),
                                (2, 5) => {
                                    value =
                                        Some(f32::from_le_bytes(p.try_into().unwrap_or_default()))
                                }
                                _ => {}
                            }
                        }
                        if let Some(value) = value {
                            values.push((tag, value));
                        }
                    }
                }
                _ => {}
            }
        }
        out.scalars
            .extend(values.into_iter().map(|(tag, value)| Scalar {
                wall_time,
                step,
                tag,
                value,
            }));
    }
    Ok(out)
}

/// Event files of a run directory, oldest first.
pub fn event_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("events.out.tfevents."))
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_known_vectors() {
        // RFC 3720 B.4 test vectors.
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
        assert_eq!(crc32c(&[0xffu8; 32]), 0x62A8_AB43);
    }

    #[test]
    fn framing_matches_tensorflow_bytes() {
        // The first record TensorFlow's own writer emits for `file_version` at wall_time 0: the length header
        // and its masked CRC are fixed by the format.
        let data = encode_event(0.0, None, EventBody::FileVersion("brain.Event:2"));
        assert_eq!(data.len(), 24);
        let f = frame(&data);
        assert_eq!(&f[..8], &24u64.to_le_bytes());
        assert_eq!(
            u32::from_le_bytes(f[8..12].try_into().unwrap()),
            masked_crc(&f[..8])
        );
        assert_eq!(f.len(), 24 + 16);
    }

    #[test]
    fn write_then_read_back() {
        let dir = std::env::temp_dir().join(format!("ytrainer-tb-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let mut w = EventWriter::create(&dir).unwrap();
        w.scalars(1, &[("loss".into(), 2.5), ("ce".into(), 3.25)])
            .unwrap();
        #[derive(serde::Serialize)]
        struct R {
            step: usize,
            eval_loss: f64,
            skipped: bool,
            name: &'static str,
        }
        w.record_fields(
            7,
            &R {
                step: 7,
                eval_loss: 1.5,
                skipped: true,
                name: "x",
            },
        )
        .unwrap();
        let path = w.path().to_path_buf();
        drop(w);
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        assert!(name.starts_with("events.out.tfevents."), "{name}");
        assert_eq!(event_files(&dir), vec![path.clone()]);
        let f = read_scalars(&path).unwrap();
        assert_eq!(f.file_version.as_deref(), Some("brain.Event:2"));
        assert_eq!(f.records, 3);
        let got: Vec<(i64, &str, f32)> = f
            .scalars
            .iter()
            .map(|s| (s.step, s.tag.as_str(), s.value))
            .collect();
        assert_eq!(
            got,
            vec![
                (1, "loss", 2.5),
                (1, "ce", 3.25),
                (7, "eval_loss", 1.5),
                (7, "skipped", 1.0)
            ]
        );
        assert!(f.scalars[0].wall_time > 1.0e9);
        // A flipped byte is caught by the CRC.
        let mut bytes = fs::read(&path).unwrap();
        let n = bytes.len();
        bytes[n - 6] ^= 1;
        fs::write(&path, &bytes).unwrap();
        assert!(read_scalars(&path).is_err());
        let _ = fs::remove_dir_all(&dir);
    }
}

//! Bounded mutation fuzzing of the model-file readers (issue 21): the GGUF reader and the safetensors header
//! reader get valid files with random damage (flipped bytes, extreme integers written over length and count
//! fields, truncation, inserted bytes) and must answer every one with a value or an error: never a panic, never
//! an allocation sized by the damaged field. Deterministic (seeded); `YTRAINER_FUZZ_ITERS` raises the number of
//! cases per reader (CI runs the default).

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

use ytrainer_core::rng::SplitMix64;
use ytrainer_models::gguf::GgufFile;
use ytrainer_models::st::SafetensorsReader;

fn iters() -> usize {
    std::env::var("YTRAINER_FUZZ_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(400)
}

/// One random damage of `seed`, mostly inside the first `hot` bytes (where headers and directories live).
fn mutate(rng: &mut SplitMix64, seed: &[u8], hot: usize) -> Vec<u8> {
    let mut b = seed.to_vec();
    for _ in 0..1 + rng.next_u64() % 4 {
        let at = (rng.next_u64() as usize) % hot.min(b.len()).max(1);
        match rng.next_u64() % 6 {
            0 => b[at] ^= 1 << (rng.next_u64() % 8),
            1 => b[at] = rng.next_u64() as u8,
            2 => {
                // an extreme little-endian integer over a length / count / offset / type field
                let v: u64 = match rng.next_u64() % 5 {
                    0 => u64::MAX,
                    1 => u32::MAX as u64,
                    2 => 1 << 40,
                    3 => 0,
                    _ => rng.next_u64(),
                };
                let w = if rng.next_u64().is_multiple_of(2) {
                    8
                } else {
                    4
                };
                let end = (at + w).min(b.len());
                b[at..end].copy_from_slice(&v.to_le_bytes()[..end - at]);
            }
            3 => {
                let cut = (rng.next_u64() as usize) % b.len().max(1);
                b.truncate(cut.max(1));
            }
            4 => {
                let n = 1 + (rng.next_u64() % 16) as usize;
                let bytes: Vec<u8> = (0..n).map(|_| rng.next_u64() as u8).collect();
                let at = at.min(b.len());
                b.splice(at..at, bytes);
            }
            _ => {
                let n = (rng.next_u64() % 16) as usize;
                let end = (at + n).min(b.len());
                b.drain(at..end);
            }
        }
        if b.is_empty() {
            b.push(0);
        }
    }
    b
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ytrainer-fuzz-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

/// Runs `read` on `iters()` damaged copies of `seed`; a panic fails the test naming the case, whose bytes are
/// left in the temp file for reproduction.
fn fuzz(name: &str, seed: &[u8], hot: usize, read: impl Fn(&Path)) {
    let path = scratch(name);
    let mut rng = SplitMix64::new(0x5EED ^ name.len() as u64);
    for case in 0..iters() {
        std::fs::write(&path, mutate(&mut rng, seed, hot)).unwrap();
        if catch_unwind(AssertUnwindSafe(|| read(&path))).is_err() {
            panic!(
                "{name}: case {case} panicked; the input is kept at {}",
                path.display()
            );
        }
    }
    std::fs::remove_dir_all(path.parent().unwrap()).ok();
}

fn manifest(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(p)
}

#[test]
fn the_gguf_reader_survives_damaged_files() {
    // every block type llama.cpp quantises to, in a 2.5 KB file
    let seed = std::fs::read(manifest("tests/fixtures/quants.gguf")).unwrap();
    assert!(GgufFile::open(&manifest("tests/fixtures/quants.gguf")).is_ok());
    fuzz("quants.gguf", &seed, seed.len(), |p| {
        if let Ok(g) = GgufFile::open(p) {
            for t in &g.tensors {
                let _ = g.read_f32(t);
            }
        }
    });
}

#[test]
fn the_safetensors_reader_survives_damaged_headers() {
    // a small valid file: two f32 tensors and a bf16 one
    let mut header = String::from(
        r#"{"__metadata__":{"format":"pt"},"a":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]},"b":{"dtype":"F32","shape":[4],"data_offsets":[24,40]},"c":{"dtype":"BF16","shape":[2,2],"data_offsets":[40,48]}}"#,
    );
    while !(header.len() + 8).is_multiple_of(8) {
        header.push(' ');
    }
    let mut seed = (header.len() as u64).to_le_bytes().to_vec();
    seed.extend(header.as_bytes());
    seed.extend((0..48u8).collect::<Vec<_>>());
    let ok = scratch("valid.safetensors");
    std::fs::write(&ok, &seed).unwrap();
    assert!(SafetensorsReader::open(&ok).is_ok());
    fuzz("st.safetensors", &seed, 8 + header.len(), |p| {
        if let Ok(mut r) = SafetensorsReader::open(p) {
            for name in ["a", "b", "c"] {
                for shape in [&[2usize, 3][..], &[4], &[2, 2]] {
                    let _ = r.read_f32(name, shape);
                }
            }
        }
    });
}

//! Device selection: the only place that knows which backends this binary was built with.

use burn::prelude::*;
use burn::tensor::FloatDType;
use serde::{Deserialize, Serialize};

/// The float type every tensor of a run is created in.
///
/// `bf16` is "pure bf16" (LLaMA-Factory's `pure_bf16`): weights, activations, gradients and AdamW moments are all
/// bf16, halving their memory. Only the LM head's softmax / cross-entropy is computed in f32 (on every backend),
/// so losses and their gradients keep full precision. Updates smaller than bf16's resolution (about 0.4% of a
/// weight) are lost, which matters for full fine-tuning with a small learning rate more than for LoRA.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    F32,
    Bf16,
}

impl Precision {
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        }
    }

    fn float_dtype(self) -> FloatDType {
        match self {
            Precision::F32 => FloatDType::F32,
            Precision::Bf16 => FloatDType::BF16,
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" | "float32" | "fp32" => Ok(Precision::F32),
            "bf16" | "bfloat16" => Ok(Precision::Bf16),
            other => Err(format!("unknown precision `{other}`: expected f32 or bf16")),
        }
    }
}

/// Parses `cpu`, `cuda`, `cuda:N`, `wgpu` or `wgpu:N` into a Burn device with autodiff enabled and the seed
/// applied: f32, unless this process already chose the device's precision (`ytrainer sweep` evaluates a bf16 trial
/// in bf16).
pub fn select(spec: &str, seed: u64) -> Result<Device, String> {
    open(spec, seed, None)
}

/// [`select`] with the float type of every tensor created on the device. Burn fixes a device's default float
/// type when its first tensor is created, process-wide, so the first selection decides; selecting the same
/// device again with another precision is an error rather than a silent mix.
pub fn select_with(spec: &str, seed: u64, precision: Precision) -> Result<Device, String> {
    open(spec, seed, Some(precision))
}

fn open(spec: &str, seed: u64, precision: Option<Precision>) -> Result<Device, String> {
    let spec = spec.trim();
    let index = |prefix: &str| -> Result<Option<usize>, String> {
        match spec.strip_prefix(prefix).and_then(|rest| rest.strip_prefix(':')) {
            None => Ok(None),
            Some(n) => n.parse().map(Some).map_err(|_| {
                format!(
                    "invalid device `{spec}`: expected `{prefix}:N` with N a GPU index, e.g. `{prefix}:0`"
                )
            }),
        }
    };
    let device = if spec == "cpu" {
        Device::flex()
    } else if spec == "cuda" || spec.starts_with("cuda:") {
        cuda(index("cuda")?.unwrap_or(0))?
    } else if spec == "wgpu" || spec.starts_with("wgpu:") {
        if precision == Some(Precision::Bf16) {
            return Err(format!(
                "device `{spec}` cannot train in bf16: the wgpu backend has no bf16 type (WGSL has none); \
                 use `--precision f32` (`[train] precision = \"f32\"`) on `{spec}`, or bf16 on `cpu` or `cuda`"
            ));
        }
        wgpu(spec, index("wgpu")?)?
    } else {
        return Err(format!(
            "invalid device `{spec}`: expected `cpu`, `cuda`, `cuda:N`, `wgpu` or `wgpu:N`"
        ));
    };
    let mut device = device;
    let want = precision.unwrap_or_default().float_dtype();
    if device.configure(want).is_err()
        && let Some(precision) = precision
    {
        let have = device.settings().float_dtype;
        if have != want {
            return Err(format!(
                "device `{spec}` already holds {have:?} tensors in this process and cannot switch to {precision}; \
                 run with one precision per process"
            ));
        }
    }
    device.seed(seed);
    Ok(device.autodiff())
}

#[cfg(feature = "cuda")]
fn cuda(index: usize) -> Result<Device, String> {
    cuda_driver()?;
    Ok(Device::cuda(index))
}

/// cudarc loads the driver library lazily and panics on a worker thread when it is missing; checking first turns
/// a machine without an NVIDIA driver into one clear error.
#[cfg(feature = "cuda")]
fn cuda_driver() -> Result<(), String> {
    const NAMES: &[&str] = &["libcuda.so.1", "libcuda.so", "nvcuda.dll"];
    for name in NAMES {
        // SAFETY: loading the system's CUDA driver library, which is what the CUDA backend does next anyway.
        if unsafe { libloading::Library::new(*name) }.is_ok() {
            return Ok(());
        }
    }
    Err(format!(
        "no CUDA driver found ({} could not be loaded): install the NVIDIA driver, point LD_LIBRARY_PATH at the \
         directory holding libcuda.so.1, or use `--device cpu`",
        NAMES.join(", ")
    ))
}

#[cfg(not(feature = "cuda"))]
fn cuda(_index: usize) -> Result<Device, String> {
    Err(
        "this ytrainer binary was built without CUDA support; rebuild it with \
         `cargo build --release -p ytrainer-cli --features cuda` or use `--device cpu`"
            .to_string(),
    )
}

/// `wgpu` is wgpu's default adapter (a discrete GPU first; Mesa's lavapipe where it is the only one);
/// `wgpu:N` the `N`th adapter wgpu lists, every kind counted. The adapter is acquired once per process (Burn keeps
/// one runtime per adapter); failures are errors, not the runtime's panic on first use.
#[cfg(feature = "wgpu")]
fn wgpu(spec: &str, index: Option<usize>) -> Result<Device, String> {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};
    /// Each adapter index asked for, and what opening it gave.
    type Opened = HashMap<Option<usize>, Result<Device, String>>;
    static OPENED: OnceLock<Mutex<Opened>> = OnceLock::new();
    let mut opened = OPENED
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    opened
        .entry(index)
        .or_insert_with(|| {
            let hint = "install a Vulkan (Linux, Windows) or Metal (macOS) driver; on Linux without a GPU, Mesa's \
                        software Vulkan driver (Debian/Ubuntu: `apt-get install mesa-vulkan-drivers`); or use \
                        `--device cpu`";
            match index {
                None => Device::wgpu_options()
                    .init()
                    .map_err(|e| format!("device `{spec}`: no wgpu adapter could be opened ({e}); {hint}")),
                Some(n) => {
                    let all: Vec<Device> = Device::enumerate(burn::tensor::DeviceType::Wgpu)
                        .into_iter()
                        .collect();
                    all.get(n).cloned().ok_or_else(|| {
                        format!(
                            "device `{spec}`: this machine has {} wgpu adapter(s), numbered from 0; use one of \
                             those or `wgpu` for the default adapter; {hint}",
                            all.len()
                        )
                    })
                }
            }
        })
        .clone()
}

#[cfg(not(feature = "wgpu"))]
fn wgpu(_spec: &str, _index: Option<usize>) -> Result<Device, String> {
    Err(
        "this ytrainer binary was built without wgpu support; rebuild it with \
         `cargo build --release -p ytrainer-cli --features wgpu` or use `--device cpu`"
            .to_string(),
    )
}

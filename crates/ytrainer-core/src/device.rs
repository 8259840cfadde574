//! Device selection: the only place that knows which backends this binary was built with.

use burn::prelude::*;

/// Parses `cpu`, `cuda` or `cuda:N` into a Burn device with autodiff enabled and the seed applied.
pub fn select(spec: &str, seed: u64) -> Result<Device, String> {
    let spec = spec.trim();
    let device = if spec == "cpu" {
        Device::flex()
    } else if spec == "cuda" || spec.starts_with("cuda:") {
        let index: usize = match spec.strip_prefix("cuda:") {
            None => 0,
            Some(n) => n.parse().map_err(|_| {
                format!(
                    "invalid device `{spec}`: expected `cuda:N` with N a GPU index, e.g. `cuda:0`"
                )
            })?,
        };
        cuda(index)?
    } else {
        return Err(format!(
            "invalid device `{spec}`: expected `cpu`, `cuda` or `cuda:N`"
        ));
    };
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

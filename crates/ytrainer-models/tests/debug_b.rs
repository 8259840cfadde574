mod common;
use common::*;
#[test]
fn b_layout() {
    let after = read_npz(&tiny_qwen2().join("lora_after_1_step.npz"));
    let k = "base_model.model.model.layers.0.self_attn.k_proj.lora_B.default.weight";
    let npy = &after[k];
    let n = npy.f32.len();
    for i in (0..24).chain(n-8..n).chain(500..516) {
        let init = -0.02 + 0.04 * i as f64 / (n - 1) as f64;
        println!("{i} after {:.7} lin {:.7} diff/lr {:.3}", npy.f32[i], init, (npy.f32[i] as f64 - init)/2e-4);
    }
}

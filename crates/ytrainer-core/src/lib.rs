//! ytrainer's engine: the model and loss-plugin interfaces, the plugin registry, the training step, the one
//! training loop and its objectives (`sft`, `preference`), the optimizer and checkpoints.
pub use burn;

pub mod checkpoint;
pub mod config;
pub mod device;
pub mod dist;
pub mod error;
pub mod external;
pub mod lm_loss;
pub mod loss;
pub mod model;
pub mod observe;
pub mod optim;
pub mod preference;
pub mod registry;
pub mod rng;
pub mod sft;
pub mod step;
pub mod tensorboard;
pub mod trainer;

//! The pure policy model shared by every Clawgress part: the config document
//! of DESIGN.md §12 (parsed and validated), identities and API-key
//! authentication, destination normalisation with the private-address guard,
//! and deterministic policy evaluation.
//!
//! This crate does no I/O, spawns nothing and knows no transport: callers
//! hand it text and request facts, it hands back typed values. Services
//! (authz, ratelimit, admin) depend on it; it depends on none of them.

pub mod bundle;
pub mod config;
pub mod destination;
pub mod eval;
pub mod identity;
pub mod path;
pub mod profiles;

pub use bundle::{Bundle, BundleError};
pub use config::{ConfigError, Document, PolicyDocument};
pub use destination::{Destination, DestinationError};
pub use eval::{Decision, PolicySet, Reason, RequestFacts, TokenFailure};
pub use identity::{AgentDirectory, AuthError, Identity};
pub use path::{normalise_path, PathError};

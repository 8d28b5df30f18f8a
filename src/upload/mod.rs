//! Upload to the cloud inspection API: the account secret, request signing, and the
//! uploader's decisions (retry classification, backoff, token freshness, batching, clock trust).
//! The contract is `shared/spec/cloud-api.md` of the project.

pub mod client;
pub mod clock_note;
pub mod credentials;
pub mod drain;
pub mod policy;
pub mod signing;
pub mod uploader;

pub use uploader::{Event, Link, Pump, Uploader};

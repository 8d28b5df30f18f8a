//! Upload to the cloud inspection API: the account secret, request signing, and the
//! uploader's decisions (retry classification, backoff, token freshness, batching, clock trust).
//! The contract is `shared/spec/cloud-api.md` of the project.

pub mod credentials;
pub mod policy;
pub mod signing;

//! The account secret's loader under its old path: it lives in [`crate::credentials`], the one
//! loader of every secret of the kiosk, and is re-exported here for the callers that name it so.

pub use crate::credentials::*;

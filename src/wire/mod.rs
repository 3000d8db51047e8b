//! The message contract.
pub mod encode;
pub mod event;
pub mod subject;

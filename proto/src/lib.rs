//! Generated protobuf and gRPC code for Conveyor. No logic lives here.
//!
//! # Layout
//! - [`v1`]: the public API (`conveyor.v1`): Admin, Produce, Fetch, Groups and Shares services.
//! - [`internal::v1`]: internal records (`conveyor.internal.v1`), such as metadata log entries.

#![allow(clippy::all, missing_debug_implementations, rust_2018_idioms)]

pub mod v1 {
    tonic::include_proto!("conveyor.v1");
}

pub mod internal {
    pub mod v1 {
        tonic::include_proto!("conveyor.internal.v1");
    }
}

//! Generated protobuf types for `proto/stream.proto` (package `stream`).
#![allow(clippy::all, missing_docs)]

include!(concat!(env!("OUT_DIR"), "/stream.rs"));

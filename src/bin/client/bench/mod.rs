//! `DKVSClient bench`: the workload and its closed-loop runner.

pub mod workload;

//! Generates the gRPC code from `proto/` with protox, so no system `protoc` is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(
        [
            "conveyor/v1/broker.proto",
            "conveyor/v1/groups.proto",
            "conveyor/v1/shares.proto",
            "conveyor/internal/v1/metadata.proto",
            "conveyor/internal/v1/raft.proto",
            "conveyor/internal/v1/groups.proto",
            "conveyor/internal/v1/shares.proto",
        ],
        ["proto"],
    )?;
    tonic_prost_build::configure().bytes(".").compile_fds(fds)?;
    Ok(())
}

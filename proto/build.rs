//! Compiles the `.proto` files with protox (pure Rust; no system `protoc` needed).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/handshake.proto",
        "proto/cluster.proto",
        "proto/transaction.proto",
        "proto/object.proto",
        "proto/admin.proto",
        "proto/replication.proto",
        "proto/packet.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    prost_build::Config::new().compile_fds(fds)?;
    Ok(())
}

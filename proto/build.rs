//! Generates the qod gRPC types, clients and servers, plus the descriptor set for reflection.
use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    let protoc = protoc_bin_vendored::protoc_bin_path().context("vendored protoc")?;
    let wkt = protoc_bin_vendored::include_path().context("vendored protoc include path")?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").context("OUT_DIR")?);
    let protos = [
        "qod/v1/common.proto",
        "qod/v1/sessions.proto",
        "qod/v1/profiles.proto",
        "qod/v1/node.proto",
    ];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("qod_descriptor.bin"))
        .compile_with_config(
            config,
            &protos.map(std::path::PathBuf::from),
            &[".".into(), wkt],
        )
        .context("compiling protos")?;
    Ok(())
}

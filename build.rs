use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // protoc comes from the vendored crate, so no system protoc is needed.
    std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?);
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .bytes(".prism.kv.v1")
        .file_descriptor_set_path(out.join("prism_kv_v1_descriptor.bin"))
        .compile_protos(&["proto/prism/kv/v1/kv.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}

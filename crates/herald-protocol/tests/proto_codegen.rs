//! The checked-in Protobuf code must be exactly what prost-build makes of `proto/client.proto`,
//! so the schema and the code cannot drift apart. The schema is compiled by protox (pure Rust),
//! so neither this test nor a build needs `protoc`.
//!
//! After editing the schema, rewrite the code with
//! `HERALD_WRITE_PROTO=1 cargo test -p herald-protocol --test proto_codegen`.

use std::path::Path;

/// How the code is generated; `src/proto/mod.rs` relies on these choices.
fn generate(out: &Path) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let fds = protox::compile(["client.proto"], [root.join("proto")]).expect("schema compiles");
    prost_build::Config::new()
        // Maps encode in key order, so the same value always gives the same bytes.
        .btree_map(["."])
        .out_dir(out)
        .compile_fds(fds)
        .expect("prost-build generates");
    std::fs::read_to_string(out.join("centrifugal.centrifuge.protocol.rs")).expect("generated")
}

#[test]
fn generated_code_matches_schema() {
    let out =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("herald-proto-{}", std::process::id()));
    std::fs::create_dir_all(&out).unwrap();
    let fresh = generate(&out);
    let _ = std::fs::remove_dir_all(&out);

    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/proto/generated.rs");
    if std::env::var_os("HERALD_WRITE_PROTO").is_some() {
        std::fs::write(&path, &fresh).unwrap();
    }
    let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        fresh == checked_in,
        "src/proto/generated.rs is stale: run HERALD_WRITE_PROTO=1 cargo test -p herald-protocol --test proto_codegen"
    );
}

//! Writes the Rust types and the tonic server of containerd's snapshots API from the `.proto`
//! files next door, without `protoc` (protox compiles them).
fn main() {
    let fds = protox::compile(["services/snapshots/v1/snapshots.proto"], ["../proto"])
        .expect("the protos compile");
    tonic_prost_build::configure()
        .build_client(false)
        .build_server(true)
        .out_dir("..")
        .compile_fds(fds)
        .expect("code generated");
}

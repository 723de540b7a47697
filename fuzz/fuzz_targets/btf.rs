//! The BTF reader (`/sys/kernel/btf/vmlinux`): a member's offset in a struct, from any bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_dataplane::bpf::btf::member_offset;

fuzz_target!(|data: &[u8]| {
    // What the agent asks for, and names taken from the blob's own string section area.
    let _ = member_offset(data, "sock", "sk_psock");
    let _ = member_offset(data, "sk_psock", "sk");
    if let Some(off) = member_offset(data, "s", "m") {
        assert!(off <= u32::MAX / 8);
    }
    let _ = member_offset(data, "", "");
});

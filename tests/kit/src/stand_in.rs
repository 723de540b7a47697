//! Stand-ins for another build's kernel programs: a program of a given type, attach type and
//! name whose whole code returns one verdict, for tests of what an agent does with links that
//! run code other than its own (an upgrade, a rollback).

// `BPF_PROG_LOAD` has no safe wrapper that takes raw instructions (aya loads ELF objects): the
// load is one raw `bpf(2)` call on buffers that live across it, and the descriptor it returns
// is taken over once.
#![allow(unsafe_code)]

use std::os::fd::{FromRawFd, OwnedFd};

use anyhow::{ensure, Result};

const BPF_PROG_LOAD: libc::c_long = 5;

/// Loads a program of `prog_type` (`enum bpf_prog_type`) for `expected_attach_type`
/// (`enum bpf_attach_type`), named `name` (cut to the kernel's 15 bytes), whose code is
/// `r0 = verdict; exit`. For cgroup sock_addr, sockops, sockopt and sk_lookup programs a
/// verdict of 1 lets everything through and steers nothing.
///
/// # Errors
///
/// The `bpf(2)` errno, with the name: `EINVAL` for a type and attach type that do not go
/// together, `EPERM` without privileges.
pub fn return_program(
    prog_type: u32,
    expected_attach_type: u32,
    name: &str,
    verdict: i32,
) -> Result<OwnedFd> {
    // BPF_MOV64_IMM(BPF_REG_0, verdict), BPF_EXIT_INSN(): opcode in the low byte, imm in the
    // high 32 bits (struct bpf_insn, little endian).
    let insns: [u64; 2] = [0xb7 | (u64::from(verdict as u32) << 32), 0x95];
    let license = c"GPL";
    let mut name_bytes = [0u8; 16];
    let len = name.len().min(15);
    name_bytes[..len].copy_from_slice(&name.as_bytes()[..len]);
    // union bpf_attr for BPF_PROG_LOAD: prog_type @0, insn_cnt @4, insns @8, license @16,
    // log_level, log_size, log_buf, kern_version, prog_flags (all 0), prog_name @48,
    // prog_ifindex @64, expected_attach_type @68; the rest zero.
    let mut attr = [0u64; 16];
    attr[0] = u64::from(prog_type) | ((insns.len() as u64) << 32);
    attr[1] = insns.as_ptr() as u64;
    attr[2] = license.as_ptr() as u64;
    attr[6] = u64::from_ne_bytes(name_bytes[..8].try_into()?);
    attr[7] = u64::from_ne_bytes(name_bytes[8..].try_into()?);
    attr[8] = u64::from(expected_attach_type) << 32;
    // SAFETY: `attr` is a `union bpf_attr` of the size passed, zero where unused; `insns` and
    // `license` outlive the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_LOAD,
            attr.as_mut_ptr(),
            std::mem::size_of_val(&attr),
        )
    };
    ensure!(
        fd >= 0,
        "loading the stand-in {name}: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: BPF_PROG_LOAD returned a new descriptor, owned by no one else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// The counters array as the builds before the counters had room to grow pinned it: a per-CPU
/// array with one slot for each of their 21 counters, where this build's has
/// [`mesh_common::COUNTER_SLOTS`]. A map of another layout, for tests of what an agent does
/// with one.
///
/// # Errors
///
/// The `bpf(2)` errno of the map's creation.
pub fn older_counters_map() -> Result<OwnedFd> {
    const BPF_MAP_TYPE_PERCPU_ARRAY: u32 = 6;
    const OLDER_SLOTS: u32 = 21;
    Ok(mesh_dataplane::sys::create_map(
        mesh_common::MAP_COUNTERS,
        BPF_MAP_TYPE_PERCPU_ARRAY,
        4,
        8,
        OLDER_SLOTS,
        0,
        None,
    )?)
}

/// Pins `map` at `pin` in place of the map pinned there, and returns that one (pin it back with
/// this function to undo).
///
/// # Errors
///
/// Opening, unpinning or pinning fails (the errno, with the path).
pub fn swap_pin(pin: &std::path::Path, map: std::os::fd::BorrowedFd<'_>) -> Result<OwnedFd> {
    use anyhow::Context;
    let current = mesh_dataplane::sys::obj_get(pin).with_context(|| pin.display().to_string())?;
    std::fs::remove_file(pin).with_context(|| pin.display().to_string())?;
    mesh_dataplane::sys::obj_pin(map, pin).with_context(|| pin.display().to_string())?;
    Ok(current)
}

//! The one module of the agent that calls the kernel through `unsafe`: socket options that no
//! safe wrapper offers. Everything here is a thin, checked call with its own error.
//!
//! Kernel versions: `SO_COOKIE` needs Linux 4.12, `SO_NETNS_COOKIE` 5.14, `BPF_OBJ_PIN` 4.4 (a
//! bpffs mount at the target path), `BPF_LINK_CREATE` for cgroup programs 5.7.
#![allow(unsafe_code)] // The one user-space module allowed `unsafe` (workspace lint `unsafe_code = "deny"`).
#![warn(missing_docs)]

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// `SO_COOKIE`: the socket's cookie, the same value kernel programs see.
const SO_COOKIE: libc::c_int = 57;
/// `SO_NETNS_COOKIE`: the cookie of the network namespace the socket lives in.
const SO_NETNS_COOKIE: libc::c_int = 71;

fn getsockopt_u64(fd: BorrowedFd<'_>, level: libc::c_int, name: libc::c_int) -> io::Result<u64> {
    let mut value: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: `value` and `len` are valid for writes of the sizes given; `fd` is a live
    // descriptor for the duration of the call.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&mut value as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if len as usize != std::mem::size_of::<u64>() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("getsockopt({level}, {name}) returned {len} bytes, expected 8"),
        ));
    }
    Ok(value)
}

/// The cookie of the socket behind `fd` (`SO_COOKIE`, Linux 4.12): the 64-bit id kernel
/// programs read with `bpf_get_socket_cookie`, unique for the boot.
///
/// # Errors
///
/// The `getsockopt` errno (`ENOPROTOOPT` before 4.12, `ENOTSOCK` for a non-socket), or
/// `InvalidData` if the kernel answers with other than 8 bytes.
pub fn socket_cookie(fd: BorrowedFd<'_>) -> io::Result<u64> {
    getsockopt_u64(fd, libc::SOL_SOCKET, SO_COOKIE)
}

/// The cookie of the network namespace the socket behind `fd` lives in (`SO_NETNS_COOKIE`,
/// Linux 5.14): the 64-bit id kernel programs read with `bpf_get_netns_cookie`.
///
/// # Errors
///
/// The `getsockopt` errno (`ENOPROTOOPT` before 5.14, `ENOTSOCK` for a non-socket), or
/// `InvalidData` if the kernel answers with other than 8 bytes.
pub fn netns_cookie(fd: BorrowedFd<'_>) -> io::Result<u64> {
    getsockopt_u64(fd, libc::SOL_SOCKET, SO_NETNS_COOKIE)
}

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_BTF_LOAD: libc::c_long = 18;
const BPF_MAP_TYPE_SK_STORAGE: u32 = 24;
const BPF_F_NO_PREALLOC: u32 = 1;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_LINK_UPDATE: libc::c_long = 29;
/// `BPF_CGROUP_SOCK_OPS` (`enum bpf_attach_type`), the attach type of sockops programs
/// (Linux 4.13); an `attach_type` for [`link_create`].
pub const BPF_CGROUP_SOCK_OPS: u32 = 3;
/// `BPF_CGROUP_INET4_CONNECT` (`enum bpf_attach_type`), cgroup/connect4 (Linux 4.17).
pub const BPF_CGROUP_INET4_CONNECT: u32 = 10;
/// `BPF_CGROUP_INET6_CONNECT` (`enum bpf_attach_type`), cgroup/connect6 (Linux 4.17).
pub const BPF_CGROUP_INET6_CONNECT: u32 = 11;
/// `BPF_CGROUP_GETSOCKOPT` (`enum bpf_attach_type`), the attach type of cgroup/getsockopt
/// programs (Linux 5.3); pass it as `attach_type` to [`link_create`].
pub const BPF_CGROUP_GETSOCKOPT: u32 = 21;
/// `BPF_SK_LOOKUP` (`enum bpf_attach_type`), sk_lookup on a network namespace (Linux 5.9).
pub const BPF_SK_LOOKUP: u32 = 36;

/// `union bpf_attr`, as a zeroed buffer larger than any command we use (the kernel requires the
/// bytes it does not know to be zero).
#[repr(C, align(8))]
struct BpfAttr([u8; 128]);

fn bpf(cmd: libc::c_long, attr: &mut BpfAttr) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a valid, initialised buffer of the size passed; the kernel reads (and for
    // some commands writes) within it, and through the pointers it holds, which every caller
    // points at live buffers of the sizes the command implies for the duration of the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.0.as_mut_ptr(),
            std::mem::size_of::<BpfAttr>(),
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// `BPF_LINK_CREATE`: attaches `prog` to `target` (a cgroup, or a network namespace for
/// [`BPF_SK_LOOKUP`]) as a bpf_link. `attach_type` is a `enum bpf_attach_type` value such as
/// [`BPF_CGROUP_GETSOCKOPT`]; `flags` is passed to the kernel as is (0 today). The link lives
/// as long as the returned descriptor or a pin of it.
///
/// Needs Linux 5.7 (cgroup bpf_links) and whatever the attach type itself needs (5.3 for
/// [`BPF_CGROUP_GETSOCKOPT`], 5.9 for [`BPF_SK_LOOKUP`]), and the privileges to attach (root).
///
/// # Errors
///
/// The `bpf(2)` errno: `EINVAL` for a kernel without cgroup links or a program of another
/// attach type, `EPERM` without privileges, `EBADF` if either descriptor is wrong.
pub fn link_create(
    prog: BorrowedFd<'_>,
    target: BorrowedFd<'_>,
    attach_type: u32,
    flags: u32,
) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    let mut attr = BpfAttr([0; 128]);
    attr.0[0..4].copy_from_slice(&(prog.as_raw_fd() as u32).to_ne_bytes());
    attr.0[4..8].copy_from_slice(&(target.as_raw_fd() as u32).to_ne_bytes());
    attr.0[8..12].copy_from_slice(&attach_type.to_ne_bytes());
    attr.0[12..16].copy_from_slice(&flags.to_ne_bytes());
    let fd = bpf(BPF_LINK_CREATE, &mut attr)?;
    // SAFETY: on success BPF_LINK_CREATE returns a new file descriptor that we now own.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
}

/// `BPF_LINK_UPDATE` (Linux 5.7): makes the link `link` run `prog` instead of its program, in
/// one step: the cgroup or namespace it is attached to never runs without one of the two
/// (cgroup links since 5.7, netns links since 5.8). No `BPF_F_REPLACE`: whichever program the
/// link ran is replaced.
///
/// # Errors
///
/// The `bpf(2)` errno: `EINVAL` if `prog` has another type or attach type than the link's
/// program, `EOPNOTSUPP` for a link type that cannot be updated, `ENOLINK` for a defunct
/// link, `EPERM` without privileges, `EBADF` if either descriptor is wrong.
pub fn link_update(link: BorrowedFd<'_>, prog: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = BpfAttr([0; 128]);
    attr.0[0..4].copy_from_slice(&(link.as_raw_fd() as u32).to_ne_bytes());
    attr.0[4..8].copy_from_slice(&(prog.as_raw_fd() as u32).to_ne_bytes());
    bpf(BPF_LINK_UPDATE, &mut attr)?;
    Ok(())
}

/// `BPF_OBJ_PIN` (Linux 4.4): pins a BPF object (here, a link) at `path` on bpffs, so that it
/// outlives this process' descriptor.
///
/// # Errors
///
/// `InvalidInput` if `path` contains a NUL byte; otherwise the `bpf(2)` errno: `EEXIST` if
/// the path is taken, `ENOENT` if its directory is missing, `EPERM` if the path is not on a
/// bpffs mount or privileges are missing.
pub fn obj_pin(fd: BorrowedFd<'_>, path: &std::path::Path) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut attr = BpfAttr([0; 128]);
    attr.0[0..8].copy_from_slice(&(path.as_ptr() as u64).to_ne_bytes());
    attr.0[8..12].copy_from_slice(&(fd.as_raw_fd() as u32).to_ne_bytes());
    bpf(BPF_OBJ_PIN, &mut attr)?;
    Ok(())
}

/// BTF for a socket-storage map: `[1] int` (the key), `[2] u32`, `[3] u16`,
/// `[4] struct orig_dst { u32 ip; u16 port; u16 _pad; }` (the value, 8 bytes).
fn sk_storage_btf() -> Vec<u8> {
    const KIND_INT: u32 = 1;
    const KIND_STRUCT: u32 = 4;
    const INT_SIGNED: u32 = 1 << 24;
    let strings: &[u8] = b"\0int\0u32\0u16\0orig_dst\0ip\0port\0_pad\0";
    let name = |s: &str| -> u32 {
        let needle = [s.as_bytes(), b"\0"].concat();
        strings
            .windows(needle.len())
            .position(|w| w == needle.as_slice())
            .map(|p| p as u32)
            .expect("name in the string table")
    };
    let mut types: Vec<u32> = Vec::new();
    // INT: name, info, size, then bits/encoding.
    types.extend([name("int"), KIND_INT << 24, 4, INT_SIGNED | 32]);
    types.extend([name("u32"), KIND_INT << 24, 4, 32]);
    types.extend([name("u16"), KIND_INT << 24, 2, 16]);
    // STRUCT: name, info (kind, member count), size, then (name, type, bit offset) per member.
    types.extend([name("orig_dst"), KIND_STRUCT << 24 | 3, 8]);
    types.extend([name("ip"), 2, 0]);
    types.extend([name("port"), 3, 32]);
    types.extend([name("_pad"), 3, 48]);
    let type_bytes: Vec<u8> = types.iter().flat_map(|w| w.to_ne_bytes()).collect();
    let mut blob = Vec::new();
    blob.extend(0xeb9f_u16.to_ne_bytes()); // magic
    blob.push(1); // version
    blob.push(0); // flags
    blob.extend(24_u32.to_ne_bytes()); // header length
    blob.extend(0_u32.to_ne_bytes()); // type section offset
    blob.extend((type_bytes.len() as u32).to_ne_bytes());
    blob.extend((type_bytes.len() as u32).to_ne_bytes()); // string section offset
    blob.extend((strings.len() as u32).to_ne_bytes());
    blob.extend(type_bytes);
    blob.extend(strings);
    blob
}

/// Creates a `BPF_MAP_TYPE_SK_STORAGE` map named `name` (at most 15 bytes kept) with an `int` key
/// and an 8-byte value described by [`sk_storage_btf`] (kernel ≥ 5.2). The kernel creates such a
/// map only with key and value BTF, which the kernel object cannot carry; the caller pins it
/// where the loader will look for it. Errors: the kernel's, from `BPF_BTF_LOAD` or
/// `BPF_MAP_CREATE`; `InvalidInput` for a value size other than 8.
pub fn create_sk_storage(name: &str, value_size: u32) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    if value_size != 8 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("the socket storage BTF describes 8-byte values, not {value_size}"),
        ));
    }
    let btf = sk_storage_btf();
    let mut attr = BpfAttr([0; 128]);
    attr.0[0..8].copy_from_slice(&(btf.as_ptr() as u64).to_ne_bytes());
    attr.0[16..20].copy_from_slice(&(btf.len() as u32).to_ne_bytes());
    let btf_fd = bpf(BPF_BTF_LOAD, &mut attr)?;
    // SAFETY: on success BPF_BTF_LOAD returns a new file descriptor that we now own.
    let btf_fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(btf_fd as i32) };

    let mut attr = BpfAttr([0; 128]);
    attr.0[0..4].copy_from_slice(&BPF_MAP_TYPE_SK_STORAGE.to_ne_bytes());
    attr.0[4..8].copy_from_slice(&4_u32.to_ne_bytes()); // key size
    attr.0[8..12].copy_from_slice(&value_size.to_ne_bytes());
    attr.0[12..16].copy_from_slice(&0_u32.to_ne_bytes()); // max entries: per socket
    attr.0[16..20].copy_from_slice(&BPF_F_NO_PREALLOC.to_ne_bytes());
    let n = name.len().min(15);
    attr.0[28..28 + n].copy_from_slice(&name.as_bytes()[..n]);
    attr.0[48..52].copy_from_slice(&(btf_fd.as_raw_fd() as u32).to_ne_bytes());
    attr.0[52..56].copy_from_slice(&1_u32.to_ne_bytes()); // key type: int
    attr.0[56..60].copy_from_slice(&4_u32.to_ne_bytes()); // value type: struct orig_dst
    let fd = bpf(BPF_MAP_CREATE, &mut attr)?;
    // SAFETY: on success BPF_MAP_CREATE returns a new file descriptor that we now own.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
}

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
/// `BPF_MAP_TYPE_HASH`.
pub const BPF_MAP_TYPE_HASH: u32 = 1;
/// `BPF_MAP_TYPE_ARRAY_OF_MAPS` (Linux 4.12).
pub const BPF_MAP_TYPE_ARRAY_OF_MAPS: u32 = 12;

/// `BPF_MAP_CREATE` of a map without BTF: `map_type` (`enum bpf_map_type`), key and value
/// sizes in bytes, `max_entries`, `flags` (`BPF_F_*`), a `name` (at most 15 bytes kept) and,
/// for a map-of-maps, a map whose type and sizes every inner map must have (`inner`).
///
/// # Errors
///
/// The `bpf(2)` errno: `EINVAL` for sizes or a type the kernel does not take (or a map-of-maps
/// without `inner`), `ENOMEM`, `EPERM` without privileges.
pub fn create_map(
    name: &str,
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    flags: u32,
    inner: Option<BorrowedFd<'_>>,
) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    let mut attr = BpfAttr([0; 128]);
    attr.0[0..4].copy_from_slice(&map_type.to_ne_bytes());
    attr.0[4..8].copy_from_slice(&key_size.to_ne_bytes());
    attr.0[8..12].copy_from_slice(&value_size.to_ne_bytes());
    attr.0[12..16].copy_from_slice(&max_entries.to_ne_bytes());
    attr.0[16..20].copy_from_slice(&flags.to_ne_bytes());
    if let Some(inner) = inner {
        attr.0[20..24].copy_from_slice(&(inner.as_raw_fd() as u32).to_ne_bytes());
    }
    let n = name.len().min(15);
    attr.0[28..28 + n].copy_from_slice(&name.as_bytes()[..n]);
    let fd = bpf(BPF_MAP_CREATE, &mut attr)?;
    // SAFETY: on success BPF_MAP_CREATE returns a new file descriptor that we now own.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
}

/// `BPF_MAP_LOOKUP_ELEM` in a map with `u32` keys and values (such as a map-of-maps, whose
/// values read back as the inner maps' ids); `None` when the key has no value.
///
/// # Errors
///
/// The `bpf(2)` errno other than `ENOENT`: `EINVAL` for a map of other key or value sizes,
/// `EBADF` if `fd` is no map.
pub fn map_lookup_u32(fd: BorrowedFd<'_>, key: u32) -> io::Result<Option<u32>> {
    let mut value = 0u32;
    let mut attr = BpfAttr([0; 128]);
    attr.0[0..4].copy_from_slice(&(fd.as_raw_fd() as u32).to_ne_bytes());
    attr.0[8..16].copy_from_slice(&(std::ptr::addr_of!(key) as u64).to_ne_bytes());
    attr.0[16..24].copy_from_slice(&(std::ptr::addr_of_mut!(value) as u64).to_ne_bytes());
    match bpf(BPF_MAP_LOOKUP_ELEM, &mut attr) {
        Ok(_) => Ok(Some(value)),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

/// `BPF_MAP_UPDATE_ELEM` (`BPF_ANY`) in a map with `u32` keys and values; for a map-of-maps,
/// `value` is the descriptor of the inner map to store. For a map-of-maps the kernel returns
/// only after an RCU grace period, when no program still runs with the inner map it replaced.
///
/// # Errors
///
/// The `bpf(2)` errno: `E2BIG` for an index past the end, `EINVAL` for an inner map of another
/// type or size, `EPERM` for a frozen map.
pub fn map_update_u32(fd: BorrowedFd<'_>, key: u32, value: u32) -> io::Result<()> {
    map_update(fd, &key, &value)
}

/// `BPF_MAP_UPDATE_ELEM` (`BPF_ANY`) of `key` → `value` in the map `fd`; the kernel reads as many
/// bytes of each as the map's key and value sizes.
fn map_update<K, V>(fd: BorrowedFd<'_>, key: &K, value: &V) -> io::Result<()> {
    let mut attr = BpfAttr([0; 128]);
    attr.0[0..4].copy_from_slice(&(fd.as_raw_fd() as u32).to_ne_bytes());
    attr.0[8..16].copy_from_slice(&(key as *const K as u64).to_ne_bytes());
    attr.0[16..24].copy_from_slice(&(value as *const V as u64).to_ne_bytes());
    bpf(BPF_MAP_UPDATE_ELEM, &mut attr)?;
    Ok(())
}

/// `BPF_MAP_UPDATE_ELEM` (`BPF_ANY`) of `socket`'s value in the socket storage map `map`
/// (`BPF_MAP_TYPE_SK_STORAGE`, 8-byte values): user space keys such a map by a socket's
/// descriptor (kernel ≥ 5.2).
///
/// # Errors
///
/// The `bpf(2)` errno: `EBADF` if `socket` is no socket, `EINVAL` for a map of another kind,
/// `ENOMEM`.
pub fn sk_storage_set(map: BorrowedFd<'_>, socket: BorrowedFd<'_>, value: u64) -> io::Result<()> {
    let key: i32 = socket.as_raw_fd();
    map_update(map, &key, &value)
}

/// Whether the operator set the glibc malloc threshold `tunable` (`mmap_threshold`,
/// `trim_threshold`): by its legacy environment variable (`env_set`) or as
/// `glibc.malloc.<tunable>` in `GLIBC_TUNABLES` (`tunables`, colon-separated `name=value`
/// pairs; glibc's "Tunables" manual). [`release_free_memory`] leaves such a threshold as the
/// operator set it.
#[cfg(any(target_env = "gnu", test))]
fn set_by_operator(env_set: bool, tunables: Option<&str>, tunable: &str) -> bool {
    env_set
        || tunables.is_some_and(|t| {
            t.split(':').any(|pair| {
                pair.split_once('=')
                    .is_some_and(|(name, _)| name.strip_prefix("glibc.malloc.") == Some(tunable))
            })
        })
}

/// glibc's default `M_MMAP_THRESHOLD` and `M_TRIM_THRESHOLD` (128 KiB, `mallopt(3)`).
#[cfg(target_env = "gnu")]
const GLIBC_DEFAULT_THRESHOLD: libc::c_int = 128 * 1024;

/// Hands the memory the allocator holds free back to the kernel, and keeps it from holding on to
/// more later. Loading the kernel object parses the kernel's BTF (about 25 MiB of short-lived
/// allocations in aya's loader, some single blocks of several MiB). With glibc, freeing such a
/// block (allocated with `mmap`) raises the allocator's dynamic thresholds to its size
/// (`mallopt(3)`, "M_MMAP_THRESHOLD": up to 32 MiB, and the trim threshold to twice that), so
/// from then on buffers of up to that size come from the heap and the heap is not given back
/// until twice that is free at its top: under a burst of new connections a freshly started agent
/// grew by 5–7 MiB and kept it. So this sets both thresholds back to glibc's defaults (which
/// also turns the dynamic adjustment off, for the later loads of pods' sk_lookup programs),
/// except a threshold the operator set (`MALLOC_MMAP_THRESHOLD_`, `MALLOC_TRIM_THRESHOLD_` or
/// `GLIBC_TUNABLES`), and then calls `malloc_trim(0)`, which shrinks the main heap and, since glibc 2.8, releases
/// (`MADV_DONTNEED`) every whole free page of every arena. Returns whether memory was released;
/// with another C library (musl returns freed memory by itself) it does nothing and returns
/// `false`.
pub fn release_free_memory() -> bool {
    #[cfg(target_env = "gnu")]
    {
        let tunables = std::env::var("GLIBC_TUNABLES").ok();
        let thresholds = [
            (
                libc::M_MMAP_THRESHOLD,
                "MALLOC_MMAP_THRESHOLD_",
                "mmap_threshold",
            ),
            (
                libc::M_TRIM_THRESHOLD,
                "MALLOC_TRIM_THRESHOLD_",
                "trim_threshold",
            ),
        ];
        for (param, _, _) in thresholds.into_iter().filter(|(_, env, tunable)| {
            !set_by_operator(
                std::env::var_os(env).is_some(),
                tunables.as_deref(),
                tunable,
            )
        }) {
            // SAFETY: `mallopt` only sets the allocator's own parameters, under its locks; a
            // threshold of 128 KiB is within the range glibc accepts (it returns 0 otherwise,
            // leaving the parameter as it was).
            unsafe { libc::mallopt(param, GLIBC_DEFAULT_THRESHOLD) };
        }
        // SAFETY: `malloc_trim` takes a padding size and only touches the allocator's own state,
        // under its locks; any value is valid.
        unsafe { libc::malloc_trim(0) != 0 }
    }
    #[cfg(not(target_env = "gnu"))]
    {
        false
    }
}

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
/// `BPF_LINK_TYPE_CGROUP` (`enum bpf_link_type`): a link on a cgroup (Linux 5.7).
pub const BPF_LINK_TYPE_CGROUP: u32 = 3;
/// `BPF_LINK_TYPE_NETNS` (`enum bpf_link_type`): a link on a network namespace, as sk_lookup's
/// (Linux 5.8).
pub const BPF_LINK_TYPE_NETNS: u32 = 5;

/// `BPF_OBJ_GET` (Linux 4.4): opens the BPF object pinned at `path`.
///
/// # Errors
///
/// `InvalidInput` if `path` contains a NUL byte; otherwise the `bpf(2)` errno: `ENOENT` if
/// nothing is pinned there, `EPERM` if the path is not on bpffs or privileges are missing.
pub fn obj_get(path: &std::path::Path) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut attr = BpfAttr([0; 128]);
    attr.0[0..8].copy_from_slice(&(path.as_ptr() as u64).to_ne_bytes());
    let fd = bpf(BPF_OBJ_GET, &mut attr)?;
    // SAFETY: on success BPF_OBJ_GET returns a new file descriptor that we now own.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
}

/// What the kernel says about a link (`struct bpf_link_info`), the fields adoption checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkInfo {
    /// `enum bpf_link_type`: [`BPF_LINK_TYPE_CGROUP`], [`BPF_LINK_TYPE_NETNS`], ….
    pub link_type: u32,
    /// The link's kernel id.
    pub id: u32,
    /// The kernel id of the program the link runs.
    pub prog_id: u32,
    /// For a cgroup link, the id of its cgroup (the inode of its cgroup v2 directory); for a
    /// netns link, the inode of its network namespace; 0 when that cgroup or namespace is gone
    /// (the link is defunct) and for other link types.
    pub target: u64,
}

/// `BPF_OBJ_GET_INFO_BY_FD` on a link (Linux 5.8; cgroup ids and netns inodes in the answer
/// since 5.8 as well).
///
/// # Errors
///
/// The `bpf(2)` errno: `EBADF`/`EINVAL` if `fd` is not a BPF link, `EINVAL` before 5.8.
pub fn link_info(fd: BorrowedFd<'_>) -> io::Result<LinkInfo> {
    // struct bpf_link_info: type u32 @0, id u32 @4, prog_id u32 @8, then a union @16 whose
    // cgroup member starts with `u64 cgroup_id` and netns member with `u32 netns_ino`.
    let mut info = [0u64; 8];
    let mut attr = BpfAttr([0; 128]);
    attr.0[0..4].copy_from_slice(&(fd.as_raw_fd() as u32).to_ne_bytes());
    attr.0[4..8].copy_from_slice(&(std::mem::size_of_val(&info) as u32).to_ne_bytes());
    attr.0[8..16].copy_from_slice(&(info.as_mut_ptr() as u64).to_ne_bytes());
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    let bytes: Vec<u8> = info.iter().flat_map(|w| w.to_ne_bytes()).collect();
    let u32_at = |o: usize| u32::from_ne_bytes(bytes[o..o + 4].try_into().expect("4 bytes"));
    let link_type = u32_at(0);
    let target = match link_type {
        BPF_LINK_TYPE_CGROUP => info[2],
        BPF_LINK_TYPE_NETNS => u64::from(u32_at(16)),
        _ => 0,
    };
    Ok(LinkInfo {
        link_type,
        id: u32_at(4),
        prog_id: u32_at(8),
        target,
    })
}

const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_MAP_GET_FD_BY_ID: libc::c_long = 14;

/// What the kernel says about a loaded program (`struct bpf_prog_info`), the fields adoption
/// compares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProgInfo {
    /// The program's kernel id.
    pub id: u32,
    /// Its name as the kernel keeps it (at most 15 bytes).
    pub name: Vec<u8>,
    /// Its tag: a hash of its instructions with the map references left out, so one build's
    /// code of a program has one tag whatever maps and global data it was loaded with.
    pub tag: [u8; 8],
    /// The names of the maps it uses, sorted (the global data sections' maps included).
    pub map_names: Vec<Vec<u8>>,
}

/// The program of kernel id `id`: `BPF_PROG_GET_FD_BY_ID` (Linux 4.13), then
/// `BPF_OBJ_GET_INFO_BY_FD` twice (the second with room for its map ids, 4.15), and the name of
/// each map by `BPF_MAP_GET_FD_BY_ID`. One lookup, where listing the loaded programs to find
/// one costs a call per program on the machine.
///
/// # Errors
///
/// The `bpf(2)` errno: `ENOENT` if no program (or one of its maps) has that id any more,
/// `EPERM` without privileges.
pub fn prog_info(id: u32) -> io::Result<ProgInfo> {
    use std::os::fd::{AsFd, FromRawFd};
    let by_id = |cmd, id: u32| -> io::Result<std::os::fd::OwnedFd> {
        let mut attr = BpfAttr([0; 128]);
        attr.0[0..4].copy_from_slice(&id.to_ne_bytes());
        let fd = bpf(cmd, &mut attr)?;
        // SAFETY: on success the GET_FD_BY_ID commands return a new descriptor we now own.
        Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
    };
    // struct bpf_prog_info: type u32 @0, id @4, tag [u8; 8] @8, ..., nr_map_ids u32 @52,
    // map_ids u64 (a pointer) @56, name [u8; 16] @64; 26 u64 words cover it.
    let info_of = |fd: BorrowedFd<'_>, info: &mut [u64; 26]| -> io::Result<()> {
        let mut attr = BpfAttr([0; 128]);
        attr.0[0..4].copy_from_slice(&(fd.as_raw_fd() as u32).to_ne_bytes());
        attr.0[4..8].copy_from_slice(&(std::mem::size_of_val(info) as u32).to_ne_bytes());
        attr.0[8..16].copy_from_slice(&(info.as_mut_ptr() as u64).to_ne_bytes());
        bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
        Ok(())
    };
    let prog = by_id(BPF_PROG_GET_FD_BY_ID, id)?;
    let mut info = [0u64; 26];
    info_of(prog.as_fd(), &mut info)?;
    let bytes =
        |info: &[u64; 26]| -> Vec<u8> { info.iter().flat_map(|w| w.to_ne_bytes()).collect() };
    let first = bytes(&info);
    let nr_map_ids = u32::from_ne_bytes(first[52..56].try_into().expect("4 bytes"));
    let mut map_ids = vec![0u32; nr_map_ids as usize];
    let mut info = [0u64; 26];
    // Ask again with room for the map ids: nr_map_ids (u32 @52) and the pointer (@56).
    info[6] = u64::from(nr_map_ids) << 32;
    info[7] = map_ids.as_mut_ptr() as u64;
    info_of(prog.as_fd(), &mut info)?;
    let b = bytes(&info);
    let name_field = &b[64..80];
    let name_len = name_field.iter().position(|&c| c == 0).unwrap_or(16);
    // struct bpf_map_info: ..., name [u8; 16] @24.
    let mut map_names = Vec::with_capacity(map_ids.len());
    for map in map_ids {
        let fd = by_id(BPF_MAP_GET_FD_BY_ID, map)?;
        let mut info = [0u64; 26];
        info_of(fd.as_fd(), &mut info)?;
        let mb = bytes(&info);
        let name = &mb[24..40];
        let len = name.iter().position(|&c| c == 0).unwrap_or(16);
        map_names.push(name[..len].to_vec());
    }
    map_names.sort();
    Ok(ProgInfo {
        id,
        name: name_field[..name_len].to_vec(),
        tag: b[8..16].try_into().expect("8 bytes"),
        map_names,
    })
}

/// What [`recv_with_fds`] read.
#[derive(Debug)]
pub struct ReceivedFds {
    /// Bytes of data read into the buffer (0: end of stream).
    pub bytes: usize,
    /// The descriptors that came with them (`SCM_RIGHTS`), owned by the caller, close-on-exec.
    pub fds: Vec<std::os::fd::OwnedFd>,
    /// The kernel dropped descriptors beyond `max_fds` (`MSG_CTRUNC`; they were closed).
    pub truncated: bool,
}

/// One `recvmsg(2)` on the Unix socket `sock`: data into `buf`, and up to `max_fds`
/// descriptors passed with it (`SCM_RIGHTS`). On a stream socket one call returns the data of
/// at most one message that carried descriptors (the kernel does not join such messages).
///
/// # Errors
///
/// The `recvmsg` errno (`EAGAIN`/`EWOULDBLOCK` once a receive timeout expires).
pub fn recv_with_fds(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    max_fds: usize,
) -> io::Result<ReceivedFds> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    use std::os::fd::{FromRawFd, OwnedFd, RawFd};
    let mut space = vec![0u8; nix::sys::socket::cmsg_space::<RawFd>() * max_fds.max(1)];
    let mut iov = [io::IoSliceMut::new(buf)];
    let msg = recvmsg::<()>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    let mut fds = Vec::new();
    for cmsg in msg.cmsgs().map_err(io::Error::from)? {
        if let ControlMessageOwned::ScmRights(received) = cmsg {
            // SAFETY: the kernel has just installed these descriptors in this process for this
            // message; nothing else refers to them, so each is owned exactly once, here.
            fds.extend(
                received
                    .into_iter()
                    .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
            );
        }
    }
    Ok(ReceivedFds {
        bytes: msg.bytes,
        fds,
        truncated: msg.flags.contains(MsgFlags::MSG_CTRUNC),
    })
}

#[cfg(test)]
mod tests {
    use super::set_by_operator;

    /// A threshold the operator set, by either of glibc's two ways, is theirs; another
    /// tunable, or a tunable of another namespace with the same last name, is not.
    #[test]
    fn malloc_thresholds_the_operator_set_are_left_alone() {
        assert!(!set_by_operator(false, None, "mmap_threshold"));
        assert!(set_by_operator(true, None, "mmap_threshold"));
        let tunables = "glibc.malloc.arena_max=2:glibc.malloc.trim_threshold=1048576";
        assert!(set_by_operator(false, Some(tunables), "trim_threshold"));
        assert!(!set_by_operator(false, Some(tunables), "mmap_threshold"));
        assert!(!set_by_operator(
            false,
            Some("glibc.other.mmap_threshold=1"),
            "mmap_threshold"
        ));
        assert!(!set_by_operator(false, Some(""), "trim_threshold"));
    }
}

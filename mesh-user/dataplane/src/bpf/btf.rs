//! Just enough of a BTF reader to find where a member sits in a kernel struct, so the kernel
//! programs can follow `sock → sk_psock` on the running kernel without compiled-in offsets.
#![forbid(unsafe_code)]

const BTF_MAGIC: u16 = 0xeb9f;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn str_at(strings: &[u8], off: u32) -> Option<&[u8]> {
    let rest = strings.get(off as usize..)?;
    let end = rest.iter().position(|&c| c == 0)?;
    Some(&rest[..end])
}

/// The byte offset of `member` in the struct named `strukt`, as the BTF blob `btf` (little
/// endian, e.g. `/sys/kernel/btf/vmlinux`) describes it. `None` if either is not found, the
/// member is a bitfield, or the blob is malformed.
pub fn member_offset(btf: &[u8], strukt: &str, member: &str) -> Option<u32> {
    if u16_at(btf, 0)? != BTF_MAGIC {
        return None;
    }
    let hdr_len = u32_at(btf, 4)? as usize;
    let type_off = u32_at(btf, 8)? as usize;
    let type_len = u32_at(btf, 12)? as usize;
    let str_off = u32_at(btf, 16)? as usize;
    let str_len = u32_at(btf, 20)? as usize;
    let types = btf.get(hdr_len + type_off..hdr_len + type_off + type_len)?;
    let strings = btf.get(hdr_len + str_off..hdr_len + str_off + str_len)?;
    let mut at = 0;
    while at + 12 <= types.len() {
        let name_off = u32_at(types, at)?;
        let info = u32_at(types, at + 4)?;
        let vlen = (info & 0xffff) as usize;
        let kind = (info >> 24) & 0x1f;
        let kind_flag = info >> 31 == 1;
        at += 12;
        let extra = match kind {
            1 | 14 | 17 => 4,          // INT, VAR, DECL_TAG
            3 => 12,                   // ARRAY
            4 | 5 => 12 * vlen,        // STRUCT, UNION
            6 | 13 => 8 * vlen,        // ENUM, FUNC_PROTO
            15 | 19 => 12 * vlen,      // DATASEC, ENUM64
            2 | 7..=12 | 16 | 18 => 0, // PTR, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT, FUNC, FLOAT, TYPE_TAG
            _ => return None,
        };
        if (kind == KIND_STRUCT || kind == KIND_UNION)
            && str_at(strings, name_off)? == strukt.as_bytes()
        {
            for m in 0..vlen {
                let base = at + 12 * m;
                let m_name = u32_at(types, base)?;
                if str_at(strings, m_name)? != member.as_bytes() {
                    continue;
                }
                let raw = u32_at(types, base + 8)?;
                let (bits, bitfield) = if kind_flag {
                    (raw & 0x00ff_ffff, raw >> 24 != 0)
                } else {
                    (raw, false)
                };
                if bitfield || bits % 8 != 0 {
                    return None;
                }
                return Some(bits / 8);
            }
        }
        at += extra;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny BTF blob: `struct pair { int a; int b; }`.
    fn blob() -> Vec<u8> {
        let strings = b"\0int\0pair\0a\0b\0".to_vec();
        let mut types = Vec::new();
        // [1] INT "int" size 4, encoding: 32 bits
        types.extend(1u32.to_le_bytes());
        types.extend((1u32 << 24).to_le_bytes());
        types.extend(4u32.to_le_bytes());
        types.extend((32u32).to_le_bytes());
        // [2] STRUCT "pair" size 8, 2 members
        types.extend(5u32.to_le_bytes());
        types.extend(((4u32 << 24) | 2).to_le_bytes());
        types.extend(8u32.to_le_bytes());
        for (name, off) in [(10u32, 0u32), (12, 32)] {
            types.extend(name.to_le_bytes());
            types.extend(1u32.to_le_bytes());
            types.extend(off.to_le_bytes());
        }
        let mut b = Vec::new();
        b.extend(BTF_MAGIC.to_le_bytes());
        b.push(1);
        b.push(0);
        b.extend(24u32.to_le_bytes());
        b.extend(0u32.to_le_bytes());
        b.extend((types.len() as u32).to_le_bytes());
        b.extend((types.len() as u32).to_le_bytes());
        b.extend((strings.len() as u32).to_le_bytes());
        b.extend(types);
        b.extend(strings);
        b
    }

    #[test]
    fn finds_member_offsets() {
        let b = blob();
        assert_eq!(member_offset(&b, "pair", "a"), Some(0));
        assert_eq!(member_offset(&b, "pair", "b"), Some(4));
        assert_eq!(member_offset(&b, "pair", "c"), None);
        assert_eq!(member_offset(&b, "nope", "a"), None);
    }

    #[test]
    fn rejects_garbage_without_panicking() {
        assert_eq!(member_offset(&[], "pair", "a"), None);
        assert_eq!(
            member_offset(&[0x9f, 0xeb, 1, 0, 200, 0, 0, 0], "pair", "a"),
            None
        );
        let mut b = blob();
        b.truncate(40);
        assert_eq!(member_offset(&b, "pair", "b"), None);
    }

    #[test]
    fn reads_the_running_kernel_when_present() {
        // On a kernel with BTF, the two offsets the dataplane needs must be found.
        if let Ok(b) = std::fs::read("/sys/kernel/btf/vmlinux") {
            assert!(member_offset(&b, "sock", "sk_user_data").is_some());
            assert!(member_offset(&b, "sk_psock", "msg_tot_len").is_some());
            assert!(member_offset(&b, "sock_common", "skc_prot").is_some());
            assert!(member_offset(&b, "file", "f_flags").is_some());
        }
    }
}

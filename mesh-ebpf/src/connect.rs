//! `cgroup/connect4` (attached to each pod's cgroup): a connection to a service address is either
//! refused (`EPERM`, deny verdict) or rewritten to the pod's outbound listener with its original
//! destination recorded; everything else is left untouched.

use core::ffi::c_void;

use aya_ebpf::{
    helpers::bpf_get_current_cgroup_id, helpers::bpf_get_socket_cookie, macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use mesh_common::*;

use crate::maps::*;

#[cgroup_sock_addr(connect4)]
pub fn mesh_connect4(ctx: SockAddrContext) -> i32 {
    // SAFETY: the context pointer is valid for the whole program run.
    unsafe { try_connect4(&ctx) }
}

unsafe fn try_connect4(ctx: &SockAddrContext) -> i32 {
    let sa = unsafe { &mut *ctx.sock_addr };
    if sa.protocol != IPPROTO_TCP {
        return 1;
    }
    let ip = sa.user_ip4;
    let port = u16::from_be(sa.user_port as u16);
    let Some(service) = (unsafe { SERVICES.get(ServiceKey::new(ip, port)) }) else {
        return 1;
    };
    let cgroup = unsafe { bpf_get_current_cgroup_id() };
    let Some(pod) = (unsafe { PODS.get(cgroup) }) else {
        return 1;
    };
    let cfg = config();
    let allowed = match unsafe { decide(pod, service, cfg.intention_set) } {
        Some(v) => {
            let allowed = v.action == VERDICT_ALLOW;
            count_intention(v.counter, allowed);
            allowed
        }
        None => {
            count(Counter::DefaultDecisions, 1);
            cfg.default_verdict == VERDICT_ALLOW
        }
    };
    if !allowed {
        count(Counter::ConnectsDenied, 1);
        return 0;
    }
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr as *mut c_void) };
    let orig = OrigDst { ip, port, _pad: 0 };
    if ORIG_BY_COOKIE.insert(cookie, orig, 0).is_err() {
        // Without a record of the original destination the proxy could not serve the connection:
        // refuse it rather than let it reach the service unproxied.
        count(Counter::ConnectsDenied, 1);
        return 0;
    }
    sa.user_ip4 = LOOPBACK_IP4;
    sa.user_port = u32::from(pod.outbound_port.to_be());
    count(Counter::Redirects, 1);
    1
}

/// The intention that decides a connection from `pod` to `service`: at most nine lookups, from
/// precedence 9 down to 1, whatever the number of intentions.
#[inline(always)]
unsafe fn decide(pod: &PodValue, service: &ServiceValue, set: u32) -> Option<IntentionValue> {
    let map = if set == 0 {
        &INTENTIONS_0
    } else {
        &INTENTIONS_1
    };
    for (src_ns, src_name, dst_ns, dst_name) in INTENTION_PATTERNS {
        let key = IntentionKey {
            src_ns: if src_ns { pod.ns } else { 0 },
            src_name: if src_name { pod.name } else { 0 },
            dst_ns: if dst_ns { service.ns } else { 0 },
            dst_name: if dst_name { service.name } else { 0 },
        };
        if let Some(v) = unsafe { map.get(key) } {
            return Some(*v);
        }
    }
    None
}

#[inline(always)]
fn count_intention(counter: u32, allowed: bool) {
    if let Some(c) = INTENTION_COUNTS.get_ptr_mut(counter) {
        // SAFETY: per-CPU value, no concurrent writer on this CPU while the program runs.
        unsafe {
            if allowed {
                (*c).allowed += 1;
            } else {
                (*c).denied += 1;
            }
        }
    } else {
        let first = if allowed {
            IntentionCounts {
                allowed: 1,
                denied: 0,
            }
        } else {
            IntentionCounts {
                allowed: 0,
                denied: 1,
            }
        };
        let _ = INTENTION_COUNTS.insert(counter, first, 0);
    }
}

//! The mesh node agent: kernel dataplane loader, catalog, identity, intentions and proxy.
//!
//! `unsafe` lives only in [`sys`], the one module that talks to the kernel directly; every other
//! module is `#![forbid(unsafe_code)]`.

pub mod agent;
pub mod bpf;
pub mod catalog;
pub mod cgroup;
pub mod durable;
pub mod fakeservice;
pub mod identity;
pub mod intentions;
pub mod iptables;
pub mod k8s;
pub mod local;
pub mod netns;
pub mod proxy;
pub mod socket;
pub mod sys;

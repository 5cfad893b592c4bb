// The eBPF program is a binary target; this empty library lets qod-daemon name the crate as a build-dependency.
#![no_std]

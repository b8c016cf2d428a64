//! Virtual-time tests of the deploykit engines on the testkit's fakes. One
//! test binary, a module per area.

mod util;

mod blue_green;
mod canary;
mod canary_flag;
mod chaos;
mod crash;
mod fixtures;
mod flags;
mod fuzz_corpus;
mod gates;
mod judges;
mod kubernetes;
mod props;
mod recreate;
mod regions;
mod rolling;
mod routed;
mod routing;
mod schedules;
mod variants;

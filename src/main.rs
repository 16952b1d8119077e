// jemalloc: events are allocated on decoding threads and freed on others; glibc's allocator
// spent about 13% of the W1 benchmark in malloc/free, jemalloc and mimalloc far less, and
// jemalloc kept the peak RSS lowest (155 MB against 200 MB for mimalloc on W1).
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() {
    std::process::exit(centralflow::cli::main());
}

// mimalloc: events are allocated on decoding threads and freed on others, which glibc's
// allocator handles poorly (measured: about 13% of the W1 benchmark in malloc/free).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    std::process::exit(centralflow::cli::main());
}

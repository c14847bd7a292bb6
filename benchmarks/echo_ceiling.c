/* The echo of benchmarks/echo_ceiling.py in C: blocking sockets, one thread per direction.
 *
 *   echo_ceiling echo  cut|store SIZE            listens on 127.0.0.1, prints its port
 *   echo_ceiling relay cut|store SIZE UPSTREAM   listens, prints its port; a client gets its own upstream
 *   echo_ceiling client SIZE PORT                per line "SECONDS" on stdin: echoes for that long,
 *                                                answers "COUNT ELAPSED" on stdout
 *
 * "cut" forwards bytes as they arrive; "store" holds SIZE bytes before sending them
 * on, as a router that forwards whole frames does. Build: cc -O2 -pthread.
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <semaphore.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static size_t size;
static int store;

static void die(const char *what) {
    perror(what);
    exit(1);
}

static void nodelay(int fd) {
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

static int write_all(int fd, const char *p, size_t n) {
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w <= 0) return -1;
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

/* Copy src to dst until src ends: at once (cut) or SIZE bytes at a time (store). */
static void pump(int src, int dst) {
    char *buf = malloc(size);
    size_t have = 0;
    for (;;) {
        ssize_t r = read(src, buf + have, size - have);
        if (r <= 0) break;
        if (!store) {
            if (write_all(dst, buf, (size_t)r) < 0) break;
            continue;
        }
        have += (size_t)r;
        if (have == size) {
            if (write_all(dst, buf, size) < 0) break;
            have = 0;
        }
    }
    free(buf);
    shutdown(dst, SHUT_WR);
}

struct pair { int src, dst; };

static void *pump_thread(void *arg) {
    struct pair *p = arg;
    pump(p->src, p->dst);
    return NULL;
}

static int listener(void) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof a;
    if (fd < 0 || bind(fd, (struct sockaddr *)&a, sizeof a) < 0 || listen(fd, 16) < 0) die("listen");
    getsockname(fd, (struct sockaddr *)&a, &len);
    printf("%d\n", ntohs(a.sin_port));
    fflush(stdout);
    return fd;
}

static int dial(int port) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port), .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    if (fd < 0 || connect(fd, (struct sockaddr *)&a, sizeof a) < 0) die("connect");
    nodelay(fd);
    return fd;
}

static void serve(int upstream_port) {
    int lfd = listener();
    for (;;) {
        int fd = accept(lfd, NULL, NULL);
        if (fd < 0) die("accept");
        nodelay(fd);
        struct pair *there = malloc(sizeof *there), *back = malloc(sizeof *back);
        pthread_t t;
        if (upstream_port) { /* relay: client -> upstream and upstream -> client */
            int up = dial(upstream_port);
            *there = (struct pair){fd, up};
            *back = (struct pair){up, fd};
            pthread_create(&t, NULL, pump_thread, back);
            pthread_detach(t);
        } else { /* echo: the client's bytes back to it */
            *there = (struct pair){fd, fd};
        }
        pthread_create(&t, NULL, pump_thread, there);
        pthread_detach(t);
    }
}

static sem_t go;
static int client_fd;
static char *message;

static void *sender(void *arg) {
    (void)arg;
    for (;;) {
        sem_wait(&go);
        if (write_all(client_fd, message, size) < 0) die("write");
    }
    return NULL;
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void client(int port) {
    char line[64], *buf = malloc(size);
    pthread_t t;
    message = malloc(size);
    memset(message, 'x', size);
    client_fd = dial(port);
    sem_init(&go, 0, 0);
    pthread_create(&t, NULL, sender, NULL);
    while (fgets(line, sizeof line, stdin)) {
        double started = now(), deadline = started + atof(line), end;
        long count = 0;
        do {
            size_t missing = size;
            sem_post(&go);
            while (missing > 0) {
                ssize_t r = read(client_fd, buf, missing);
                if (r <= 0) die("read");
                missing -= (size_t)r;
            }
            count++;
            end = now();
        } while (end < deadline);
        printf("%ld %.6f\n", count, end - started);
        fflush(stdout);
    }
}

int main(int argc, char **argv) {
    if (argc >= 4 && !strcmp(argv[1], "client")) {
        size = strtoul(argv[2], NULL, 10);
        client(atoi(argv[3]));
    } else if (argc >= 4 && (!strcmp(argv[1], "echo") || !strcmp(argv[1], "relay"))) {
        store = !strcmp(argv[2], "store");
        size = strtoul(argv[3], NULL, 10);
        serve(argc >= 5 ? atoi(argv[4]) : 0);
    } else {
        fprintf(stderr, "usage: echo_ceiling echo|relay cut|store SIZE [UPSTREAM] | client SIZE PORT\n");
        return 2;
    }
    return 0;
}

/* A backend without Python, checked by normref: LayerNorm forward in float32, in C99.
 *
 *   layernorm GOLDEN RESULTS
 *
 * GOLDEN is a `normref export --layout npy-dir` directory (see GOLDEN/README.md): cases.tsv lists
 * the cases, and each case's arrays are .npy files under GOLDEN/<stem>/step<k>/, its
 * hyper-parameters "name<TAB>JSON value" lines in GOLDEN/<stem>/step<k>/hparams.tsv.  For every
 * layer_norm float32 case that needs a result this program reads x (and the optional weight and
 * bias), axes and eps, computes
 *
 *     y = (x - mean) / sqrt(var + eps) * weight + bias     (mean, biased var over the axes)
 *
 * in float32 (two passes: the mean, then the mean of squared deviations), and writes
 * RESULTS/<stem>/step<k>/outputs/y.npy.  It declares itself forward-only (declare.json:
 * "gradients": false), so no cotangents are exported and no gradient is judged.  Then
 * `normref judge GOLDEN RESULTS` gives the verdicts.
 */
#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#define MAX_DIMS 16
#define PATH 4096

typedef struct {
    int ndim;
    long shape[MAX_DIMS];
    long size;
    float *data;
} Array;

static void die(const char *what, const char *path) {
    fprintf(stderr, "layernorm: %s: %s\n", what, path);
    exit(2);
}

/* A .npy file of little-endian float32 in C order (what normref export writes for float32). */
static int read_npy(const char *path, Array *a) {
    FILE *f = fopen(path, "rb");
    if (!f) return -1;
    unsigned char head[10];
    if (fread(head, 1, 10, f) != 10 || memcmp(head, "\x93NUMPY", 6) != 0) die("not a .npy file", path);
    size_t len = head[6] == 1 ? (size_t)(head[8] | head[9] << 8) : 0;
    if (head[6] != 1) {  /* version 2 and 3: a 4-byte header length */
        unsigned char more[2];
        if (fread(more, 1, 2, f) != 2) die("truncated header", path);
        len = (size_t)head[8] | (size_t)head[9] << 8 | (size_t)more[0] << 16 | (size_t)more[1] << 24;
    }
    char *text = calloc(len + 1, 1);
    if (!text || fread(text, 1, len, f) != len) die("truncated header", path);
    if (!strstr(text, "'descr': '<f4'")) die("expected float32 ('<f4') data", path);
    if (!strstr(text, "'fortran_order': False")) die("expected C order", path);
    char *p = strstr(text, "'shape': (");
    if (!p) die("no shape in the header", path);
    p += strlen("'shape': (");
    a->ndim = 0;
    a->size = 1;
    while (*p && *p != ')') {
        char *end;
        long n = strtol(p, &end, 10);
        if (end == p) { p++; continue; }  /* ", " between dimensions */
        if (a->ndim == MAX_DIMS) die("too many dimensions", path);
        a->shape[a->ndim++] = n;
        a->size *= n;
        p = end;
    }
    free(text);
    a->data = malloc(sizeof(float) * (size_t)(a->size ? a->size : 1));
    if (!a->data || fread(a->data, sizeof(float), (size_t)a->size, f) != (size_t)a->size)
        die("truncated data", path);
    fclose(f);
    return 0;
}

static void make_parents(const char *path) {
    char buf[PATH];
    snprintf(buf, sizeof buf, "%s", path);
    for (char *p = buf + 1; *p; p++) {
        if (*p != '/') continue;
        *p = '\0';
        if (mkdir(buf, 0777) != 0 && errno != EEXIST) die("cannot create directory", buf);
        *p = '/';
    }
}

/* A version-1.0 .npy header: the dict text padded with spaces so the data starts at a multiple of 64. */
static void write_npy(const char *path, const Array *a) {
    char dict[512], shape[256] = "";
    for (int i = 0; i < a->ndim; i++) {  /* a Python tuple: (), (n,), (a, b) */
        char dim[32];
        snprintf(dim, sizeof dim, "%s%ld", i ? ", " : "", a->shape[i]);
        strcat(shape, dim);
    }
    if (a->ndim == 1) strcat(shape, ",");
    int n = snprintf(dict, sizeof dict, "{'descr': '<f4', 'fortran_order': False, 'shape': (%s), }", shape);
    int total = 10 + n + 1;
    int pad = (64 - total % 64) % 64;
    make_parents(path);
    FILE *f = fopen(path, "wb");
    if (!f) die("cannot write", path);
    uint16_t len = (uint16_t)(n + pad + 1);
    unsigned char head[10] = {0x93, 'N', 'U', 'M', 'P', 'Y', 1, 0, (unsigned char)(len & 0xff),
                              (unsigned char)(len >> 8)};
    fwrite(head, 1, 10, f);
    fwrite(dict, 1, (size_t)n, f);
    for (int i = 0; i < pad; i++) fputc(' ', f);
    fputc('\n', f);
    fwrite(a->data, sizeof(float), (size_t)a->size, f);
    fclose(f);
}

/* eps and the normalized axes from "name<TAB>JSON value" lines. */
static void read_hparams(const char *path, double *eps, int *axes, int *naxes) {
    FILE *f = fopen(path, "r");
    if (!f) die("cannot read", path);
    char line[1024];
    *naxes = 0;
    while (fgets(line, sizeof line, f)) {
        char *value = strchr(line, '\t');
        if (!value) continue;
        *value++ = '\0';
        if (strcmp(line, "eps") == 0) *eps = strtod(value, NULL);
        if (strcmp(line, "axes") == 0) {
            for (char *p = value; *p && *p != ']';) {
                char *end;
                long ax = strtol(p, &end, 10);
                if (end == p) { p++; continue; }
                if (*naxes == MAX_DIMS) die("too many axes", path);
                axes[(*naxes)++] = (int)ax;
                p = end;
            }
        }
    }
    fclose(f);
}

/* y = LayerNorm(x) over the axes: element l belongs to row r(l) (its index over the other axes)
 * and takes the gain and bias at p(l) (its index over the normalized axes, in increasing order). */
static void layer_norm(const Array *x, const Array *w, const Array *b, const int *axes, int naxes, float eps,
                       Array *y) {
    int normalized[MAX_DIMS] = {0};
    for (int i = 0; i < naxes; i++) normalized[axes[i] < 0 ? axes[i] + x->ndim : axes[i]] = 1;
    long row_len = 1;
    for (int d = 0; d < x->ndim; d++) row_len *= normalized[d] ? x->shape[d] : 1;
    long rows = row_len ? x->size / row_len : 0;
    long *row = malloc(sizeof(long) * (size_t)(x->size ? x->size : 1));
    long *param = malloc(sizeof(long) * (size_t)(x->size ? x->size : 1));
    float *sum = calloc((size_t)(rows ? rows : 1), sizeof(float));
    float *sq = calloc((size_t)(rows ? rows : 1), sizeof(float));
    for (long l = 0; l < x->size; l++) {
        long rest = l, r = 0, p = 0, rstride = 1, pstride = 1;
        for (int d = x->ndim - 1; d >= 0; d--) {
            long i = rest % x->shape[d];
            rest /= x->shape[d];
            if (normalized[d]) { p += i * pstride; pstride *= x->shape[d]; }
            else { r += i * rstride; rstride *= x->shape[d]; }
        }
        row[l] = r;
        param[l] = p;
        sum[r] += x->data[l];
    }
    for (long r = 0; r < rows; r++) sum[r] /= (float)row_len;  /* now the mean */
    for (long l = 0; l < x->size; l++) {
        float d = x->data[l] - sum[row[l]];
        sq[row[l]] += d * d;
    }
    *y = *x;
    y->data = malloc(sizeof(float) * (size_t)(x->size ? x->size : 1));
    for (long l = 0; l < x->size; l++) {
        float rstd = 1.0f / sqrtf(sq[row[l]] / (float)row_len + eps);
        float v = (x->data[l] - sum[row[l]]) * rstd;
        if (w) v *= w->data[param[l]];
        if (b) v += b->data[param[l]];
        y->data[l] = v;
    }
    free(row), free(param), free(sum), free(sq);
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: layernorm GOLDEN RESULTS\n");
        return 2;
    }
    const char *golden = argv[1], *results = argv[2];
    char path[PATH], line[2048];
    snprintf(path, sizeof path, "%s/cases.tsv", golden);
    FILE *cases = fopen(path, "r");
    if (!cases) die("cannot read", path);
    int done = 0;
    if (!fgets(line, sizeof line, cases)) die("empty", path);  /* the header line */
    while (fgets(line, sizeof line, cases)) {
        /* id  op  dtype  case  stem  run  steps  needs_result */
        char *field[8];
        int n = 0;
        for (char *p = strtok(line, "\t\n"); p && n < 8; p = strtok(NULL, "\t\n")) field[n++] = p;
        if (n < 8 || strcmp(field[1], "layer_norm") || strcmp(field[2], "float32") || !atoi(field[7])) continue;
        const char *stem = field[4];
        for (int k = 0; k < atoi(field[6]); k++) {
            Array x, w, b, y;
            double eps = 1e-5;
            int axes[MAX_DIMS], naxes = 0;
            snprintf(path, sizeof path, "%s/%s/step%d/inputs/x.npy", golden, stem, k);
            if (read_npy(path, &x) != 0) die("cannot read", path);
            snprintf(path, sizeof path, "%s/%s/step%d/inputs/weight.npy", golden, stem, k);
            int has_w = read_npy(path, &w) == 0;
            snprintf(path, sizeof path, "%s/%s/step%d/inputs/bias.npy", golden, stem, k);
            int has_b = read_npy(path, &b) == 0;
            snprintf(path, sizeof path, "%s/%s/step%d/hparams.tsv", golden, stem, k);
            read_hparams(path, &eps, axes, &naxes);
            layer_norm(&x, has_w ? &w : NULL, has_b ? &b : NULL, axes, naxes, (float)eps, &y);
            snprintf(path, sizeof path, "%s/%s/step%d/outputs/y.npy", results, stem, k);
            write_npy(path, &y);
            free(x.data), free(y.data);
            if (has_w) free(w.data);
            if (has_b) free(b.data);
        }
        done++;
    }
    fclose(cases);
    snprintf(path, sizeof path, "%s/info.json", results);
    make_parents(path);
    FILE *info = fopen(path, "w");
    if (!info) die("cannot write", path);
    fprintf(info, "{\"framework\": \"golden_c\", \"version\": \"1\", \"device\": \"cpu\"}\n");
    fclose(info);
    printf("layernorm: wrote %d cases to %s\n", done, results);
    return 0;
}

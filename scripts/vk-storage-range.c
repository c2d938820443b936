/* LD_PRELOAD shim for scripts/check-llama-server.sh: raises the
 * maxStorageBufferRange that a Vulkan driver advertises (Mesa's lavapipe
 * says 128 MiB) so that llama.cpp's Vulkan backend accepts larger weight
 * tensors instead of handing their matrix products to a CPU backend that
 * cannot run here. The new value is VK_MAX_STORAGE_BUFFER_RANGE, or 2 GiB - 1.
 *
 * llama.cpp resolves Vulkan entry points through vkGetInstanceProcAddr, so
 * that is the one symbol interposed; it wraps the two property queries. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef void (*PFN_vkVoidFunction)(void);
typedef PFN_vkVoidFunction (*PFN_vkGetInstanceProcAddr)(void *instance, const char *name);
typedef void (*PFN_properties)(void *physical_device, void *properties);

/* VkPhysicalDeviceProperties: five uint32 (20 bytes), deviceName[256],
 * pipelineCacheUUID[16] (292), then VkPhysicalDeviceLimits aligned to 8
 * (296), whose eighth uint32 is maxStorageBufferRange (+28). */
#define MAX_STORAGE_BUFFER_RANGE_OFFSET (296 + 28)
/* VkPhysicalDeviceProperties2: sType, padding, pNext, then the properties. */
#define PROPERTIES2_OFFSET 16

static PFN_properties real_properties, real_properties2;

static void raise_limit(uint8_t *properties) {
    const char *env = getenv("VK_MAX_STORAGE_BUFFER_RANGE");
    uint32_t wanted = env ? (uint32_t)strtoul(env, NULL, 0) : 0x7fffffffu, current;
    memcpy(&current, properties + MAX_STORAGE_BUFFER_RANGE_OFFSET, sizeof current);
    if (wanted > current)
        memcpy(properties + MAX_STORAGE_BUFFER_RANGE_OFFSET, &wanted, sizeof wanted);
}

static void properties(void *device, void *p) {
    real_properties(device, p);
    raise_limit(p);
}

static void properties2(void *device, void *p) {
    real_properties2(device, p);
    raise_limit((uint8_t *)p + PROPERTIES2_OFFSET);
}

PFN_vkVoidFunction vkGetInstanceProcAddr(void *instance, const char *name) {
    static PFN_vkGetInstanceProcAddr real;
    if (!real)
        real = (PFN_vkGetInstanceProcAddr)dlsym(RTLD_NEXT, "vkGetInstanceProcAddr");
    PFN_vkVoidFunction f = real(instance, name);
    if (!f || !name)
        return f;
    if (!strcmp(name, "vkGetPhysicalDeviceProperties")) {
        real_properties = (PFN_properties)f;
        return (PFN_vkVoidFunction)properties;
    }
    if (!strcmp(name, "vkGetPhysicalDeviceProperties2") ||
        !strcmp(name, "vkGetPhysicalDeviceProperties2KHR")) {
        real_properties2 = (PFN_properties)f;
        return (PFN_vkVoidFunction)properties2;
    }
    return f;
}
